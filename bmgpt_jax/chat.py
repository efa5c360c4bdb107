"""Talk to BioMedGPT about molecules and proteins: prompts -> answers, like the reference's `Conversation`.

A `Prompt` is the reference's prompt text, one placeholder (`<moleculeHere>`, `<proteinHere>`) per entity,
plus the entities in placeholder order. One human turn is `### Human: {entity tags} {question}` (or the
question's own placeholders, filled in order), each answer is `### Assistant: {answer} `, so a one-turn
prompt is exactly `format_prompt` of the record without its answer: the training layout up to
`### Assistant: `. Encoding splits the text at the placeholders and tokenizes the pieces separately (BOS
on the first) with one slot per atom / ESM position, as the reference does; a batch is `collate`d
(right-padded, shapes bucketed so repeated questions reuse compiled code), embedded by a jitted
`embed_inputs` and decoded by `generate` from the spliced embeddings, stopping at EOS or `###`.

    python -m bmgpt_jax.chat --checkpoint DIR --smiles 'CC(=O)Oc1ccccc1C(=O)O' --question 'What is it?'
    python -m bmgpt_jax.chat --checkpoint DIR --interactive
    python -m bmgpt_jax.chat --checkpoint DIR --jsonl questions.jsonl --output answers.jsonl

A checkpoint DIR holds `biomedgpt_10b.pth` (OpenBioMed's flat layout), `llm_config.json` (HF Llama),
`esm_config.json` (HF ESM), the tokenizer (`tokenizer.model`, or a `tokenizer/` folder holding one) and
optionally `gin_config.json`; `save_pretrained` writes one, `from_pretrained` reads it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx

from bmgpt_jax.data import examples, molecules, proteins
from bmgpt_jax.data.records import ENTITY_KINDS
from bmgpt_jax.data.text import DEFAULT_SYSTEM, ENTITY_TAGS, PLACEHOLDERS, Tokenizer, encode_segments, load_tokenizer
from bmgpt_jax.generate import GenerationConfig, generate

PATTERN = re.compile("|".join(PLACEHOLDERS.values()))
KIND_OF = {v: k for k, v in PLACEHOLDERS.items()}
OPTIONS = ("max_new_tokens", "do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
           "length_penalty", "seed")
FILES = {"pth": "biomedgpt_10b.pth", "lm": "llm_config.json", "esm": "esm_config.json", "gin": "gin_config.json",
         "tokenizer": "tokenizer.model"}
ROW_KEYS = ("question", "smiles", "protein", "system", "id")


def as_tokenizer(tokenizer) -> Tokenizer:
    """A `Tokenizer`, or one loaded from a SentencePiece `.model` path or a folder holding one."""
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(os.fspath(tokenizer))


def attach_tokenizer(model, tokenizer):
    """Give `model` its tokenizer (see `as_tokenizer`) for `model.chat`. A plain attribute: static in
    `nnx.split`'s graphdef (hashed by identity), so params, jit and checkpoints are unaffected. Returns `model`."""
    tok = as_tokenizer(tokenizer)
    vocab = model.config.lm.vocab_size
    if tok.vocab_size > vocab:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model's vocabulary is {vocab}")
    model.tokenizer = tok
    return model


def tokenizer_of(model) -> Tokenizer:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer: pass tokenizer= to openbiomed.load, use from_pretrained, "
                         "or call bmgpt_jax.chat.attach_tokenizer(model, tokenizer)")
    return tok


@dataclasses.dataclass(frozen=True)
class Prompt:
    """`text`: the prompt with one placeholder per entity; `entities`: (kind, value) in placeholder order."""
    text: str
    entities: tuple[tuple[str, str], ...]


def as_entities(smiles=None, protein=None) -> list[tuple[str, str]]:
    """`smiles` / `protein` (a string, a list of them, or None) as (kind, value) pairs, molecules first."""
    listed = lambda v: [] if v is None else [v] if isinstance(v, str) else list(v)  # noqa: E731
    return [("molecule", s) for s in listed(smiles)] + [("protein", p) for p in listed(protein)]


def human_message(question: str, entities: Sequence[tuple[str, str]]) -> tuple[str, tuple]:
    """One human turn and its entities in placeholder order. Without placeholders in `question` the entity
    tags come first (the reference's template); otherwise each placeholder takes the next entity of its
    kind, and the counts must match."""
    text = question
    for kind, hole in PLACEHOLDERS.items():
        open_tag, close_tag = ENTITY_TAGS[kind]
        text = text.replace(open_tag + hole + close_tag, hole).replace(hole, open_tag + hole + close_tag)
    found = [KIND_OF[h] for h in PATTERN.findall(text)]
    if not found:
        tags = [f"{ENTITY_TAGS[k][0]}{PLACEHOLDERS[k]}{ENTITY_TAGS[k][1]}" for k, _ in entities]
        return " ".join(tags + [question]) if tags else question, tuple(entities)
    queues = {k: [v for kind, v in entities if kind == k] for k in ENTITY_KINDS}
    for kind in ENTITY_KINDS:
        holes, given = found.count(kind), len(queues[kind])
        if holes > given:
            raise ValueError(f"question {question!r} has {holes} {PLACEHOLDERS[kind]} placeholder(s) but "
                             f"{given} {kind}(s) were given")
        if given > holes:
            raise ValueError(f"{kind} {queues[kind][holes]!r} has no {PLACEHOLDERS[kind]} placeholder in "
                             f"question {question!r} ({holes} placeholder(s), {given} {kind}(s))")
    return text, tuple((k, queues[k].pop(0)) for k in found)


def make_prompt(question: str, entities: Sequence[tuple[str, str]] = (), system: str | None = None,
                history: Sequence[tuple[str, str]] = (), history_entities: tuple = ()) -> Prompt:
    """The prompt asking `question` about `entities` after the answered turns `history` ((human message,
    answer) pairs whose placeholders `history_entities` fill). `system=None`: the reference's default."""
    human, ents = human_message(question, entities)
    text = DEFAULT_SYSTEM if system is None else system
    for msg, answer in [*history, (human, None)]:
        text += f"### Human: {msg} ### Assistant: " + ("" if answer is None else f"{answer} ")
    return Prompt(text, tuple(history_entities) + ents)


def stop_sequences(tok: Tokenizer) -> tuple[tuple[int, ...], ...]:
    """The token sequences of the reference's stop word `###`: as a word (Llama: `[835]`) and glued to the
    text before it (Llama: `[2277, 29937]`), derived from `tok` so any SentencePiece model works."""
    word, head, glued = tok.encode("###"), tok.encode("a"), tok.encode("a###")
    seqs = {tuple(word)} | ({tuple(glued[len(head):])} if glued[:len(head)] == head else set())
    return tuple(sorted(seqs, key=lambda s: (len(s), s)))


def generation_config(tok: Tokenizer, options: dict) -> GenerationConfig:
    """Chat defaults (greedy, 256 new tokens, stop at EOS or `###`) with HF-named `options` applied."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown generation option(s) {unknown}; valid: {list(OPTIONS)}")
    return GenerationConfig(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, stop_sequences=stop_sequences(tok),
                            **options)


def encode_prompt(model, prompt: Prompt, max_new_tokens: int, max_protein_len: int = 1024) -> examples.Encoded:
    """`prompt` encoded for generation (no answer, no EOS): entities featurized (an invalid SMILES or residue
    raises `ValueError` naming it; molecules over the GIN's atom cap follow its `over_cap`, proteins are cut
    to `max_protein_len` ESM tokens as in training), and the prompt plus `max_new_tokens` checked to fit
    the LM's context."""
    holes = [KIND_OF[h] for h in PATTERN.findall(prompt.text)]
    if holes != [k for k, _ in prompt.entities]:
        raise ValueError(f"the prompt's placeholders {holes} do not match its entities {list(prompt.entities)}")
    pieces = PATTERN.split(prompt.text)
    segments = [pieces[0]] + [s for i, p in enumerate(pieces[1:]) for s in (i, p)]
    gin, feats = model.config.gin, []
    for kind, value in prompt.entities:
        if kind == "molecule":
            f = molecules.featurize(value)
            feats.append((f, molecules.kept_atoms(len(f[0]), gin.max_atoms, gin.over_cap, value)))
        else:
            ids, mask = proteins.tokenize([value], max_length=max_protein_len, ids=[f"protein {value[:40]!r}"])
            feats.append(ids[0])
    lengths = [len(f[1]) if isinstance(f, tuple) else len(f) for f in feats]
    enc = encode_segments(tokenizer_of(model), segments, lengths, answer=False)
    context = model.config.lm.max_position_embeddings
    if len(enc.input_ids) + max_new_tokens > context:
        sizes = ", ".join(f"{k} {v[:40]!r}: {n} tokens" for (k, v), n in zip(prompt.entities, lengths))
        raise ValueError(f"prompt of {len(enc.input_ids)} positions ({len(enc.input_ids) - sum(lengths)} text "
                         f"tokens{'; ' + sizes if sizes else ''}) plus max_new_tokens={max_new_tokens} exceeds "
                         f"the context of {context}")
    mols, prots = [], []
    for f, start in zip(feats, enc.slot_starts):
        if isinstance(f, tuple):
            (atoms, edge_index, bonds), keep = f
            node_pos = np.full(len(atoms), -1, np.int32)
            node_pos[keep] = start + np.arange(len(keep), dtype=np.int32)
            mols.append((atoms, edge_index, bonds, node_pos))
        else:
            prots.append((f, start))
    return examples.Encoded(enc.input_ids, enc.loss_mask, mols, prots)


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def collate_prompts(encoded: Sequence[examples.Encoded], rows: int | None = None,
                    max_len: int | None = None) -> dict[str, np.ndarray]:
    """The right-padded batch of `encoded` (docs/batch_format.md), `rows` rows (default: one per prompt;
    spare rows repeat the first prompt), `T` and protein width rounded up to multiples of 64 (`T` capped
    at `max_len`: the context left for the prompt) and the graph budget to `molecules.choose_bucket`'s
    ladder, so nearby prompt sizes share one compilation."""
    encoded = list(encoded) + [encoded[0]] * ((rows or len(encoded)) - len(encoded))
    n, e, g, p = (sum(x) for x in zip(*(ex.budget for ex in encoded)))
    nodes, edges, graphs = molecules.choose_bucket(n, e, g)
    prot_len = max([len(ids) for ex in encoded for ids, _ in ex.prots] or [1])
    budget = examples.Budget(batch=len(encoded), nodes=nodes, edges=edges, graphs=graphs,
                             proteins=_round_up(p, 4) if p else 0)
    longest = max(ex.length for ex in encoded)
    T = max(longest, min(_round_up(longest, 64), max_len or longest))
    return examples.collate(encoded, T, budget, _round_up(prot_len, 64))


@partial(jax.jit, static_argnames="graphdef")
def _embed(graphdef, state, batch):
    return nnx.merge(graphdef, state).embed_inputs(batch)


def generate_tokens(model, encoded: Sequence[examples.Encoded], config: GenerationConfig,
                    rows: int | None = None) -> np.ndarray:
    """New token ids `[len(encoded), max_new_tokens]` (pad after a row's EOS/stop) for encoded prompts:
    the spliced embeddings of the batch (GIN in eval mode) decoded by `generate` on `model.llm`."""
    batch = collate_prompts(encoded, rows, max_len=model.config.lm.max_position_embeddings - config.max_new_tokens)
    graphdef, state = nnx.split(nnx.view(model, use_running_average=True, deterministic=True))
    embeds = _embed(graphdef, state, batch)
    out = generate(model.llm, inputs_embeds=embeds, attention_mask=batch["attention_mask"], config=config)
    return out[:len(encoded)]


def answer_text(tok: Tokenizer, tokens) -> str:
    """The reference's post-processing: decode, cut at `###`, keep what follows a stray `Assistant:`."""
    return tok.decode(tokens).split("###")[0].split("Assistant:")[-1].strip()


def answer_prompts(model, prompts: Sequence[Prompt], **options) -> list[str]:
    """One answer per prompt, generated as one batch; `options`: HF-named generation options."""
    tok = tokenizer_of(model)
    cfg = generation_config(tok, options)
    encoded = [encode_prompt(model, p, cfg.max_new_tokens) for p in prompts]
    return [answer_text(tok, row) for row in generate_tokens(model, encoded, cfg)]


class Conversation:
    """An interactive session like the reference's: `append_molecule` / `append_protein` add entities to the
    next question, `ask` answers it with the whole history as context, `reset` forgets everything."""

    def __init__(self, model, system: str | None = None, **options):
        tokenizer_of(model)
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
        """The answer to `question` about the pending entities plus `smiles` / `protein`."""
        entities = self.pending + as_entities(smiles, protein)
        prompt = make_prompt(question, entities, self.system, self.history, self.entities)
        answer = answer_prompts(self.model, [prompt], **{**self.options, **options})[0]
        self.history.append((human_message(question, entities)[0], answer))
        self.entities, self.pending = prompt.entities, []
        return answer


def ask(model, question: str, smiles=None, protein=None, system: str | None = None, **options) -> str:
    """`model.chat`: one answer to `question` about molecule(s) `smiles` and protein(s) `protein`."""
    return Conversation(model, system).ask(question, smiles, protein, **options)


def answer_rows(model, lines: Iterable[str], batch_size: int = 8, system: str | None = None,
                **options) -> list[dict]:
    """Batch answering of JSONL lines `{"question", "smiles"?, "protein"?, "system"?, "id"?}` (`system`: the
    default system prompt): each row comes back with `line` and `answer`, or with `error` (bad JSON or key,
    invalid SMILES/residue, placeholder mismatch, too long) while the others are answered, `batch_size`
    prompts per generate call."""
    tok = tokenizer_of(model)
    cfg = generation_config(tok, options)
    results, ready = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row: dict = {"line": n}
        try:
            data = json.loads(line)
            if not isinstance(data, dict) or "question" not in data or set(data) - set(ROW_KEYS):
                raise ValueError(f"expected an object with 'question' and only keys {list(ROW_KEYS)}")
            row.update(data)
            prompt = make_prompt(data["question"], as_entities(data.get("smiles"), data.get("protein")),
                                 data.get("system", system))
            ready.append((len(results), encode_prompt(model, prompt, cfg.max_new_tokens)))
        except (ValueError, TypeError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"line {n}: {row['error']}", file=sys.stderr)
        results.append(row)
    for i in range(0, len(ready), batch_size):
        chunk = ready[i:i + batch_size]
        tokens = generate_tokens(model, [enc for _, enc in chunk], cfg, rows=batch_size)
        for (j, _), row in zip(chunk, tokens):
            results[j]["answer"] = answer_text(tok, row)
    return results


def save_pretrained(model, tokenizer, out_dir) -> Path:
    """Write `out_dir` in the checkpoint-DIR layout (see the module docstring); `tokenizer=None`: the
    attached one. Returns the folder."""
    from bmgpt_jax.convert import hf_esm, hf_llama, openbiomed
    tok = tokenizer_of(model) if tokenizer is None else as_tokenizer(tokenizer)
    out = Path(out_dir)
    openbiomed.save(model, out / FILES["pth"])
    (out / FILES["lm"]).write_text(json.dumps(hf_llama.config_to_hf(model.config.lm), indent=1))
    (out / FILES["esm"]).write_text(json.dumps(hf_esm.config_to_hf(model.config.esm), indent=1))
    (out / FILES["gin"]).write_text(json.dumps(dataclasses.asdict(model.config.gin), indent=1))
    (out / FILES["tokenizer"]).write_bytes(tok.model_proto)
    return out


def from_pretrained(ckpt_dir, **lm_overrides):
    """BioMedGPT with its tokenizer from a checkpoint DIR; `lm_overrides`: LlamaConfig fields (`dtype`...)."""
    from bmgpt_jax.convert import openbiomed
    from bmgpt_jax.models.gin import GinConfig
    d = Path(ckpt_dir)
    tok = next((p for p in (d / FILES["tokenizer"], d / "tokenizer") if p.exists()), None)
    missing = [d / FILES[k] for k in ("pth", "lm", "esm") if not (d / FILES[k]).exists()] + \
        ([] if tok else [d / FILES["tokenizer"]])
    if missing:
        raise FileNotFoundError(f"checkpoint folder {d} lacks {[str(m) for m in missing]}")
    gin = GinConfig(**json.loads((d / FILES["gin"]).read_text())) if (d / FILES["gin"]).exists() else None
    return openbiomed.load(d / FILES["pth"], d / FILES["lm"], d / FILES["esm"], tokenizer=tok, gin_config=gin,
                           **lm_overrides)


def interactive(conv: Conversation, lines: Iterable[str], out=None) -> None:
    """The REPL: `/mol SMILES`, `/prot SEQUENCE`, `/reset`, `/quit`; any other line is a question."""
    out = out or sys.stdout
    print("commands: /mol SMILES, /prot SEQUENCE, /reset, /quit; anything else is a question", file=out)
    for line in lines:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "/quit":
                return
            if cmd == "/reset":
                conv.reset()
            elif cmd in ("/mol", "/prot"):
                (conv.append_molecule if cmd == "/mol" else conv.append_protein)(arg.strip())
            elif line.strip():
                print(f"Assistant: {conv.ask(line.strip())}", file=out, flush=True)
        except ValueError as e:
            print(f"error: {e}", file=out, flush=True)


def add_generation_args(ap) -> None:
    """`--dtype` and the generation options (HF names as flags) on a command line."""
    ap.add_argument("--dtype", help="LM compute dtype, e.g. bfloat16")
    for name, kind in (("max_new_tokens", int), ("num_beams", int), ("temperature", float), ("top_k", int),
                       ("top_p", float), ("repetition_penalty", float), ("length_penalty", float), ("seed", int)):
        ap.add_argument("--" + name.replace("_", "-"), type=kind)
    ap.add_argument("--do-sample", action="store_true", default=None)


def model_and_options(args):
    """The checkpoint of `args.checkpoint` (in `args.dtype`) and the generation options given on the line."""
    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    return from_pretrained(args.checkpoint, **({"dtype": args.dtype} if args.dtype else {})), options


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
    ap.add_argument("--output", help="--jsonl results (default: stdout)")
    ap.add_argument("--batch-size", type=int, default=8)
    add_generation_args(ap)
    args = ap.parse_args(argv)
    model, options = model_and_options(args)
    if args.interactive:
        interactive(Conversation(model, args.system, **options), stdin)
        return 0
    if args.question is not None:
        try:
            print(ask(model, args.question, args.smiles, args.protein, args.system, **options))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    with open(args.jsonl) as f:
        results = answer_rows(model, f, args.batch_size, args.system, **options)
    text = "".join(json.dumps(r) + "\n" for r in results)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
