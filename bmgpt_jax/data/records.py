"""The one record type every dataset is converted into, and the bad-record tally of a build.

A `Record` is a question about zero or more entities (molecules as SMILES, proteins as amino-acid
sequences) with its answer. Plain text for language-model training is a record with no entities and no
question (`is_plain_text`): the whole `answer` is the text. Builders store records in tfds with
`features()`; the pipeline reads them back with `Record.from_example`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from pathlib import Path

ENTITY_KINDS = ("molecule", "protein")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Record:
    """One example: `entities` is a tuple of (kind, value) with kind in `ENTITY_KINDS`, in prompt order.

    `label` is the short gold answer of a multiple-choice or yes/no question ("B", "yes"), "" otherwise;
    `id` names the source row (a CID, PMID, accession, line number) for error messages and evaluation.
    """
    entities: tuple[tuple[str, str], ...]
    question: str
    answer: str
    label: str = ""
    id: str = ""

    def __post_init__(self):
        for kind, _ in self.entities:
            if kind not in ENTITY_KINDS:
                raise ValueError(f"record {self.id!r}: entity kind {kind!r} is not one of {ENTITY_KINDS}")

    @property
    def is_plain_text(self) -> bool:
        return not self.entities and not self.question

    def to_example(self) -> dict:
        """The tfds example dict (see `features()`)."""
        return {"entity_kinds": [k for k, _ in self.entities], "entity_values": [v for _, v in self.entities],
                "question": self.question, "answer": self.answer, "label": self.label, "id": self.id}

    @classmethod
    def from_example(cls, ex: dict) -> "Record":
        """Inverse of `to_example` for what tfds data sources return (text as bytes)."""
        s = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        entities = tuple(zip(map(s, ex["entity_kinds"]), map(s, ex["entity_values"])))
        return cls(entities, s(ex["question"]), s(ex["answer"]), s(ex["label"]), s(ex["id"]))


def features():
    """tfds FeaturesDict of a record: only text features, so no tensorflow is needed to write or read."""
    import tensorflow_datasets as tfds
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        "entity_kinds": tfds.features.Sequence(text), "entity_values": tfds.features.Sequence(text),
        "question": text, "answer": text, "label": text, "id": text})


class BadRecords:
    """Counts skipped records per reason and keeps the first few examples of each, for the build report."""

    def __init__(self, keep: int = 3):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.keep = keep

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < self.keep:
            kept.append(example[:300])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """`{reason: {"count": n, "examples": [...]}}`, JSON-able."""
        return {r: {"count": n, "examples": self.examples[r]} for r, n in sorted(self.counts.items())}

    def report(self, what: str) -> str:
        """A readable summary, also logged as a warning when anything was skipped."""
        if not self.counts:
            return f"{what}: no bad records"
        lines = [f"{what}: skipped {self.total} bad record(s)"]
        for reason, info in self.as_dict().items():
            lines.append(f"  {reason}: {info['count']} (e.g. {'; '.join(info['examples'])})")
        text = "\n".join(lines)
        log.warning(text)
        return text


def cache_dir(*parts: str) -> Path:
    """`$BMGPT_CACHE` or `$XDG_CACHE_HOME/bmgpt_jax` or `~/.cache/bmgpt_jax`, joined with `parts`, created."""
    root = os.environ.get("BMGPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bmgpt_jax"
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
