"""Chat prompts: the reference's template with one placeholder per entity, encoded for generation.

A `Prompt` is the prompt text, one placeholder (`<moleculeHere>`, `<proteinHere>`) per entity, plus the
entities in placeholder order. One human message is `### Human: {entity tag} {question}`, or with several
entities `### Human: {tag 1} ### Human: {tag 2} {question}` (each entity its own human turn, the question
after the last tag, as the reference's `append_molecule` / `append_protein` / `ask` build it), or the
question's own placeholders filled in order; each answer is `### Assistant: {answer} `, so a one-turn
prompt is exactly `format_prompt` of the record without its answer: the training layout up to
`### Assistant: `.
Encoding splits the text at the placeholders and tokenizes the pieces separately (BOS on the first) with
one slot per atom / ESM position, as the reference does; a batch is `collate_prompts`d (right-padded,
shapes bucketed so repeated questions reuse compiled code).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from . import examples, molecules, proteins
from .records import ENTITY_KINDS
from .text import DEFAULT_SYSTEM, ENTITY_TAGS, PLACEHOLDERS, TURN, Tokenizer, encode_segments

PATTERN = re.compile("|".join(PLACEHOLDERS.values()))
KIND_OF = {v: k for k, v in PLACEHOLDERS.items()}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """`text`: the prompt with one placeholder per entity; `entities`: (kind, value) in placeholder order."""
    text: str
    entities: tuple[tuple[str, str], ...]


def as_entities(smiles=None, protein=None) -> list[tuple[str, str]]:
    """`smiles` / `protein` (a string, a list or tuple of them, or None) as (kind, value) pairs, molecules
    first. Anything else is a TypeError naming the argument (a JSONL row's field), not a failure deep in
    the encoding (`{"protein": [5]}` was "'int' object is not subscriptable")."""
    mols, prots = _strings("smiles", smiles), _strings("protein", protein)
    return [("molecule", s) for s in mols] + [("protein", p) for p in prots]


def _strings(name: str, value) -> list[str]:
    """`value` (None, a string, a list or tuple of strings) as a list; TypeError naming `name` otherwise."""
    values = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a string or a list of strings, not {value!r:.60}")
    return list(values)


def human_message(question: str, entities: Sequence[tuple[str, str]]) -> tuple[str, tuple]:
    """One human message and its entities in placeholder order. Without placeholders in `question` each
    entity's tag is a human turn of its own and the question follows the last one (the reference's
    `Conversation`: `<molecule>..</molecule> ### Human: <protein>..</protein> {question}`); otherwise each
    placeholder takes the next entity of its kind, and the counts must match."""
    text = question
    for kind, hole in PLACEHOLDERS.items():
        open_tag, close_tag = ENTITY_TAGS[kind]
        text = text.replace(open_tag + hole + close_tag, hole).replace(hole, open_tag + hole + close_tag)
    found = [KIND_OF[h] for h in PATTERN.findall(text)]
    if not found:
        tags = [f"{ENTITY_TAGS[k][0]}{PLACEHOLDERS[k]}{ENTITY_TAGS[k][1]}" for k, _ in entities]
        return TURN.join(tags[:-1] + [f"{tags[-1]} {question}"]) if tags else question, tuple(entities)
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


def check_system(system: str | None) -> None:
    """A system prompt `make_prompt` takes (None: the reference's default): a `system` that is not a string
    is a TypeError naming it, one holding an entity placeholder a ValueError (the command lines check
    `--system` with this before anything loads)."""
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string (or None: the default), not {system!r:.60}")
    if system is not None and PATTERN.search(system):
        raise ValueError(f"the system prompt {system!r:.60} holds an entity placeholder; entities go in questions")


def make_prompt(question: str, entities: Sequence[tuple[str, str]] = (), system: str | None = None,
                history: Sequence[tuple[str, str]] = (), history_entities: tuple = ()) -> Prompt:
    """The prompt asking `question` about `entities` after the answered turns `history` ((human message,
    answer) pairs whose placeholders `history_entities` fill). `system=None`: the reference's default.
    An empty question (or one that is not a string) is a ValueError; a `system` that is not a string, a
    TypeError naming it, and one holding a placeholder, a ValueError (`check_system`). A placeholder in an
    answer (text the model generated, with no entity behind it) is removed, so it cannot take a later
    turn's entity."""
    if question is not None and not isinstance(question, str):
        raise ValueError(f"the question must be a string, not {question!r:.60}")
    if not question or not question.strip():
        raise ValueError(f"the question is empty ({question!r}): there is nothing to answer")
    check_system(system)
    human, ents = human_message(question, entities)
    text = (DEFAULT_SYSTEM if system is None else system) + "### "
    for msg, answer in [*history, (human, None)]:
        text += f"Human: {msg} ### Assistant: "
        if answer:   # as the reference's `_wrap_prompt`: an empty answer is a bare "Assistant: ", no "###" after
            text += f"{PATTERN.sub('', answer)} ### "
    return Prompt(text, tuple(history_entities) + ents)


def encode_prompt(tok: Tokenizer, prompt: Prompt, *, max_new_tokens: int, context: int, max_atoms: int | None,
                  over_cap: str, max_protein_len: int = 1024) -> examples.Encoded:
    """`prompt` encoded for generation (no answer, no EOS): entities featurized (an invalid SMILES or residue
    raises `ValueError` naming it; one token per atom, or with a `max_atoms` cap molecules over it follow
    `over_cap`, as the GIN's config says; proteins are cut to `max_protein_len` ESM tokens as in training),
    and the prompt plus `max_new_tokens` checked to fit the LM's `context` (0: the prompt alone, as
    evaluation's log-likelihood scoring needs it; the error then names no new tokens)."""
    holes = [KIND_OF[h] for h in PATTERN.findall(prompt.text)]
    if holes != [k for k, _ in prompt.entities]:
        raise ValueError(f"the prompt's placeholders {holes} do not match its entities {list(prompt.entities)}")
    pieces = PATTERN.split(prompt.text)
    segments = [pieces[0]] + [s for i, p in enumerate(pieces[1:]) for s in (i, p)]
    feats = []
    for kind, value in prompt.entities:
        if kind == "molecule":
            f = molecules.featurize(value)
            feats.append((f, molecules.kept_atoms(len(f[0]), max_atoms, over_cap, value)))
        else:
            ids, mask = proteins.tokenize([value], max_length=max_protein_len, ids=[f"protein {value[:40]!r}"])
            feats.append(ids[0])
    lengths = [len(f[1]) if isinstance(f, tuple) else len(f) for f in feats]
    enc = encode_segments(tok, segments, lengths, answer=False)
    if len(enc.input_ids) + max_new_tokens > context:
        sizes = ", ".join(f"{k} {v[:40]!r}: {n} tokens" for (k, v), n in zip(prompt.entities, lengths))
        room = f" plus max_new_tokens={max_new_tokens}" if max_new_tokens else ""   # 0: the prompt alone
        raise ValueError(f"prompt of {len(enc.input_ids)} positions ({len(enc.input_ids) - sum(lengths)} text "
                         f"tokens{'; ' + sizes if sizes else ''}){room} exceeds the context of {context}")
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
