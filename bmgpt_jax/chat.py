"""Talk to BioMedGPT about molecules and proteins: prompts -> answers, like the reference's `Conversation`.

Questions become prompts in the reference's template (`data.prompts`: placeholders, entity slots, one
BOS); a batch of them is collated, embedded by a jitted `embed_inputs` (molecule and protein tokens
spliced in) and decoded by `generation.generate` from the spliced embeddings, stopping at EOS as the
reference does (`--stop-at-separator`: at the turn separator `###` too).

    python -m bmgpt_jax.chat --checkpoint DIR --smiles 'CC(=O)Oc1ccccc1C(=O)O' --question 'What is it?'
    python -m bmgpt_jax.chat --checkpoint DIR --interactive
    python -m bmgpt_jax.chat --checkpoint DIR --jsonl questions.jsonl --output answers.jsonl [--resume]
    python -m bmgpt_jax.chat --checkpoint DIR --mesh 1,1,8 --dtype bfloat16 ...   # weights over 8 devices

DIR is a model folder (`convert.folder`: weights, configs, tokenizer), e.g. a training run's `final/`.
`--mesh data,fsdp,tensor` loads the weights straight into their shards on that device mesh (each device
reads only its slices; the rule table of `parallel`), for a model larger than one device's memory
(BioMedGPT-10B's 9.58B parameters in bfloat16 are 19.2 GB: `1,1,8` on a TPU v5e-8 host, 16 GB a chip);
without it, all on one device.
What cannot be answered (a missing or corrupt folder, an empty question, an invalid SMILES, a `--jsonl`
that cannot be read or an `--output` that cannot be written) is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from functools import partial
from pathlib import Path
from typing import Container, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from bmgpt_jax import inputs, logs, parallel
from bmgpt_jax.convert.folder import from_pretrained
from bmgpt_jax.data import examples, molecules, proteins
from bmgpt_jax.data import prompts as prompt_lib
from bmgpt_jax.data.prompts import Prompt, as_entities, check_system, collate_prompts, human_message, make_prompt
from bmgpt_jax.data.text import Tokenizer, tokenizer_of
from bmgpt_jax.generation import GenerationConfig, generate
from bmgpt_jax.inputs import check_output_file, one_line, positive_int
from bmgpt_jax.model_args import OPTIONS, add_generation_args, hf_options, mesh_shape, model_and_options

# the Python API (docs/chat.md): this module's own, and the loader its examples call through it
__all__ = ["Conversation", "answer_prompts", "answer_rows", "answer_text", "ask", "encode_prompt", "from_pretrained",
           "generate_tokens", "generation_config", "iter_answers", "main", "stop_sequences"]
ROW_KEYS = ("question", "smiles", "protein", "system", "id")
def stop_sequences(tok: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """The token sequences of the turn separator `###` (`stop_at_separator`): as a word (Llama: `[835]`) and
    glued to the text before it (Llama: `[2277, 29937]`), derived from `tok` so any SentencePiece model works.
    (MiniGPT-4 hard-codes these Llama ids as stop words; the reference stops at EOS only.)"""
    word, head, glued = tok.encode("###"), tok.encode("a"), tok.encode("a###")
    seqs = {tuple(word)} | ({tuple(glued[len(head):])} if glued[:len(head)] == head else set())
    return tuple(sorted(seqs, key=lambda s: (len(s), s)))


def generation_config(tok: Tokenizer, options: dict, eos: int | Sequence[int] = ()) -> GenerationConfig:
    """Chat defaults (greedy, 256 new tokens, stop at EOS: the reference's) with `options` applied: the
    HF-named ones, and `stop_at_separator=True` to stop at `###` too (`stop_sequences`). A reply ends at the
    tokenizer's EOS and at any of `eos`, the LM config's id(s) (a config.json list, as HF's `generate`)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}; valid: {list(OPTIONS)}")
    stops = stop_sequences(tok) if options.get("stop_at_separator") else ()
    ids = tuple(dict.fromkeys((tok.eos_id, *((eos,) if isinstance(eos, int) else eos))))
    return GenerationConfig(eos_token_id=ids if len(ids) > 1 else ids[0], pad_token_id=tok.pad_id,
                            stop_sequences=stops, **hf_options(options))


def encode_prompt(model, prompt: Prompt, max_new_tokens: int, max_protein_len: int = 1024) -> examples.Encoded:
    """`data.prompts.encode_prompt` with `model`'s tokenizer, atom cap and context."""
    gin = model.config.gin
    return prompt_lib.encode_prompt(tokenizer_of(model), prompt, max_new_tokens=max_new_tokens,
                                   context=model.config.lm.max_position_embeddings, max_atoms=gin.max_atoms,
                                   over_cap=gin.over_cap, max_protein_len=max_protein_len)


@partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _embed(graphdef, state, batch, mesh=None):
    """The batch's spliced embeddings, traced within the mesh `state` lies on (`parallel.mesh_of`), so the
    encoders' attention and the model's constraints apply as in training."""
    with parallel.within(mesh):
        return nnx.merge(graphdef, state).embed_inputs(batch)


def generate_tokens(model, encoded: Sequence[examples.Encoded], config: GenerationConfig,
                    rows: int | None = None) -> np.ndarray:
    """New token ids `[len(encoded), max_new_tokens]` (pad after a row's EOS/stop) for encoded prompts:
    the spliced embeddings of the batch (GIN in eval mode) decoded by `generate` on `model.llm`."""
    batch = collate_prompts(encoded, rows, max_len=model.config.lm.max_position_embeddings - config.max_new_tokens)
    graphdef, state = nnx.split(nnx.view(model, use_running_average=True, deterministic=True))
    embeds = _embed(graphdef, state, batch, mesh=parallel.mesh_of(state))
    out = generate(model.llm, inputs_embeds=embeds, attention_mask=batch["attention_mask"], config=config)
    return out[:len(encoded)]


def answer_text(tok: Tokenizer, tokens, stop_at_separator: bool = False, eos: Sequence[int] = ()) -> str:
    """The reference's post-processing: decode (up to EOS: the tokenizer's or any of `eos`), keep what
    follows the last `Assistant:`, strip. `stop_at_separator`: cut at the first `###` before that (the text of
    a decode that stopped there)."""
    tokens = [int(t) for t in tokens]
    ends = [k for k, t in enumerate(tokens) if t in eos]
    text = tok.decode(tokens[:ends[0]] if ends else tokens)
    return (text.split("###")[0] if stop_at_separator else text).split("Assistant:")[-1].strip()


def answer_prompts(model, prompts: Sequence[Prompt], **options) -> list[str]:
    """One answer per prompt, generated as one batch; `options`: HF-named generation options."""
    tok = tokenizer_of(model)
    cfg = generation_config(tok, options, model.config.lm.eos_token_id)
    encoded = [encode_prompt(model, p, cfg.max_new_tokens) for p in prompts]
    cut = bool(options.get("stop_at_separator"))
    return [answer_text(tok, row, cut, cfg.eos_ids) for row in generate_tokens(model, encoded, cfg)]


class Conversation:
    """An interactive session like the reference's: `append_molecule` / `append_protein` add entities to the
    next question, `ask` answers it with the whole history as context, `reset` forgets everything."""

    def __init__(self, model, system: str | None = None, **options):
        tokenizer_of(model)
        check_system(system)         # refused now, not at every question
        self.model, self.system, self.options = model, system, options
        self.reset()

    def reset(self) -> None:
        self.history: list[tuple[str, str]] = []
        self.entities: tuple = ()
        self.pending: list[tuple[str, str]] = []

    def append_molecule(self, smiles: str) -> None:
        molecules.featurize(smiles)  # a bad SMILES fails here, not at the next question
        self.pending.append(("molecule", smiles))

    def append_protein(self, sequence: str) -> None:
        proteins.encode(sequence, f"protein {sequence[:40]!r}")
        self.pending.append(("protein", sequence))

    def ask(self, question: str, smiles=None, protein=None, **options) -> str:
        """The answer to `question` about the pending entities plus `smiles` / `protein`. The pending
        entities belong to this question whether it is answered or fails (a protein too long for the
        context would otherwise fail every later question the same way): a failure leaves the history as
        it was and raises ValueError naming what was dropped."""
        entities, self.pending = self.pending + as_entities(smiles, protein), []
        try:
            prompt = make_prompt(question, entities, self.system, self.history, self.entities)
            answer = answer_prompts(self.model, [prompt], **{**self.options, **options})[0]
        except ValueError as e:
            dropped = ", ".join(f"{kind} {value[:40]!r}" for kind, value in entities)
            raise ValueError(f"{e} (dropped with the question: {dropped})" if dropped else str(e)) from None
        self.history.append((human_message(question, entities)[0], answer))
        self.entities = prompt.entities
        return answer


def ask(model, question: str, smiles=None, protein=None, system: str | None = None, **options) -> str:
    """One answer to `question` about molecule(s) `smiles` and protein(s) `protein`."""
    return Conversation(model, system).ask(question, smiles, protein, **options)


def answer_rows(model, lines: Iterable[str], batch_size: int = 8, system: str | None = None,
                **options) -> list[dict]:
    """Every row of `iter_answers` (below) as a list."""
    return list(iter_answers(model, lines, batch_size, system, **options))


def iter_answers(model, lines: Iterable[str | bytes], batch_size: int = 8, system: str | None = None,
                 skip: Container[int] = (), **options) -> Iterator[dict]:
    """Batch answering of JSONL lines `{"question", "smiles"?, "protein"?, "system"?, "id"?}` (`system`: the
    default system prompt), `batch_size` prompts per generate call. Yields one row per non-blank line, in
    line order, with `line` and `answer`, or with `error` (bad JSON, an unknown key (named) or no question,
    invalid SMILES/residue, placeholder mismatch, too long) while the others are answered. Lazy: lines are
    read and rows yielded batch by batch, so a caller writing each row as it comes keeps every finished batch if the job dies.
    `skip`: line numbers not to answer (those a previous run already wrote, `--resume`). A line given as
    bytes is decoded alone, so one that is not UTF-8 is that line's error, not the end of the job."""
    tok = tokenizer_of(model)
    cfg = generation_config(tok, options, model.config.lm.eos_token_id)
    cut = bool(options.get("stop_at_separator"))
    pending: list[dict] = []                          # rows since the last decoded batch
    ready: list[tuple[int, examples.Encoded]] = []    # (index in pending, encoded prompt)

    def decode() -> list[dict]:
        if ready:
            tokens = generate_tokens(model, [enc for _, enc in ready], cfg, rows=batch_size)
            for (j, _), row in zip(ready, tokens):
                pending[j]["answer"] = answer_text(tok, row, cut, cfg.eos_ids)
        done = pending.copy()
        pending.clear()
        ready.clear()
        return done

    for n, line in enumerate(lines, 1):
        if not line.strip() or n in skip:
            continue
        row: dict = {"line": n}
        try:
            # a line that is not UTF-8: UnicodeDecodeError, a ValueError, so that line's error
            data = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
            if isinstance(data, dict):   # the input's fields, refused or not, so rows join back to inputs
                row.update({k: v for k, v in data.items() if k not in ("line", "answer", "error")})
            _check_row_keys(data)
            prompt = make_prompt(data["question"], as_entities(data.get("smiles"), data.get("protein")),
                                 data.get("system", system))
            ready.append((len(pending), encode_prompt(model, prompt, cfg.max_new_tokens)))
        except (ValueError, TypeError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"line {n}: {row['error']}", file=sys.stderr)
        pending.append(row)
        if len(ready) == batch_size:
            yield from decode()
    yield from decode()


def _check_row_keys(data) -> None:
    """ValueError unless `data` (a parsed `--jsonl` line) is an object with `question` and only `ROW_KEYS`,
    naming the key(s) at fault: another key (a typo such as `smile`) is refused, not ignored, so that no
    entity or setting of the line is dropped silently."""
    expected = f"expected an object with 'question' and only keys {list(ROW_KEYS)}"
    if not isinstance(data, dict):
        raise ValueError(f"{expected}, not {type(data).__name__}")
    unknown = [key for key in data if key not in ROW_KEYS]
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}: {expected}")
    if "question" not in data:
        raise ValueError(f"no 'question': {expected}")


def written_rows(path: Path) -> list[dict]:
    """The complete rows of a `--jsonl` output (`inputs.written_rows`: a torn last line dropped)."""
    return inputs.written_rows(path, lambda row: isinstance(row.get("line"), int), "an answer row of `chat --jsonl`")


def interactive(conv: Conversation, lines: Iterable[str], out=None) -> None:
    """The REPL: `/mol SMILES`, `/prot SEQUENCE`, `/reset`, `/quit`; another `/word` is an error (not
    asked as a question); any other line is a question."""
    out = out or sys.stdout
    commands = "commands: /mol SMILES, /prot SEQUENCE, /reset, /quit; anything else is a question"
    print(commands, file=out)
    for line in lines:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "/quit":
                return
            if cmd == "/reset":
                conv.reset()
            elif cmd in ("/mol", "/prot"):
                (conv.append_molecule if cmd == "/mol" else conv.append_protein)(arg.strip())
            elif cmd[:1] == "/" and cmd[1:].isalpha():
                print(f"error: unknown command {cmd}; {commands}", file=out, flush=True)
            elif line.strip():
                print(f"Assistant: {conv.ask(line.strip())}", file=out, flush=True)
        except ValueError as e:
            print(f"error: {e}", file=out, flush=True)


@logs.cli
def main(argv: Sequence[str] | None = None, stdin: Iterable[str] = sys.stdin) -> int:
    ap = argparse.ArgumentParser(prog="python -m bmgpt_jax.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder (see above)")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--question", help="answer one question (with --smiles / --protein)")
    mode.add_argument("--interactive", action="store_true")
    mode.add_argument("--jsonl", help="answer every line of this JSONL file")
    ap.add_argument("--smiles", action="append", help="a molecule (repeatable)")
    ap.add_argument("--protein", action="append", help="a protein sequence (repeatable)")
    ap.add_argument("--system", help="system prompt (default: the reference's)")
    ap.add_argument("--output", help="--jsonl results, a row per line as each batch is answered (default: stdout); "
                    "an existing file is overwritten, unless --resume")
    ap.add_argument("--resume", action="store_true",
                    help="with --output: keep the rows it holds and answer only the other lines")
    ap.add_argument("--batch-size", type=positive_int, help="--jsonl prompts per generate call (default 8)")
    ap.add_argument("--mesh", type=mesh_shape, help="data,fsdp,tensor: load the weights sharded over this device "
                    "mesh, e.g. 1,1,8 (default: one device; a leading -1 takes '=': --mesh=-1,1,1)")
    add_generation_args(ap)
    args = ap.parse_args(argv)
    if args.resume and not (args.jsonl and args.output):
        ap.error("--resume needs --jsonl and --output")
    for flag, given in (("--output", args.output), ("--batch-size", args.batch_size)):   # not silently ignored
        if given is not None and not args.jsonl:
            ap.error(f"{flag} needs --jsonl (--question and --interactive answer on stdout, one at a time)")
    entities = [flag for flag, given in (("--smiles", args.smiles), ("--protein", args.protein)) if given]
    if entities and args.question is None:
        ap.error(f"{' and '.join(entities)} go{'es' if len(entities) == 1 else ''} with --question only "
                 "(--interactive: /mol SMILES, /prot SEQUENCE; --jsonl: each line's \"smiles\", \"protein\")")
    lines = None
    try:   # the input and where the rows go are checked before the model loads
        check_system(args.system)
        if args.output:
            check_output_file(args.output, "--output")
        if args.resume and Path(args.output).exists():
            written_rows(Path(args.output))   # a file that is not ours stops here
        lines = open(args.jsonl, "rb") if args.jsonl else None   # bytes: iter_answers decodes each line alone
        model, options, _ = model_and_options(args)
    except (OSError, ValueError) as e:
        if lines:
            lines.close()
        print(f"chat: {one_line(e)}", file=sys.stderr)
        return 2
    if args.interactive or args.question is not None:
        try:
            if args.interactive:
                interactive(Conversation(model, args.system, **options), stdin)
            else:
                print(ask(model, args.question, args.smiles, args.protein, args.system, **options))
        except ValueError as e:
            print(f"chat: {one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:   # Ctrl-C ends a session (or a long answer): one line, not a traceback
            print("chat: interrupted", file=sys.stderr)
            return 130
        return 0
    try:
        output, skip = _open_output(args)
    except OSError as e:
        lines.close()
        print(f"chat: cannot write --output {args.output}: {one_line(e)}", file=sys.stderr)
        return 2
    try:
        with lines, output as out:
            for row in iter_answers(model, lines, args.batch_size or 8, args.system, skip=skip, **options):
                out.write(json.dumps(row) + "\n")
                out.flush()
    except KeyboardInterrupt:
        kept = f"; the rows written are kept in {args.output} (--resume answers the rest)" if args.output else ""
        print(f"chat: interrupted{kept}", file=sys.stderr)
        return 130
    return 0


def _open_output(args):
    """(the file `--jsonl` rows go to, as a context manager; the line numbers it already answers): stdout,
    `--output` new, or with `--resume` the existing `--output` rewritten with its complete rows and
    appended to. OSError when it cannot be written."""
    if not args.output:
        return contextlib.nullcontext(sys.stdout), frozenset()
    path = Path(args.output)
    rows = written_rows(path) if args.resume and path.exists() else []
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    if rows:
        print(f"chat: {path} already answers {len(rows)} line(s); answering the others", file=sys.stderr)
    return open(path, "a"), frozenset(r["line"] for r in rows)


if __name__ == "__main__":
    sys.exit(main())
