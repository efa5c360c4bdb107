"""Plain-text corpus for stage-1 language-model training: `*.txt` (documents separated by blank lines)
and `*.jsonl` (one `{"text": ...}` a line) files in a folder, as records with no question (`is_plain_text`).
"""
from __future__ import annotations

from .base import RecordBuilder, read_jsonl
from ..records import Record


class TextCorpus(RecordBuilder, skip_registration=True):
    """Every document of every `*.txt` / `*.jsonl` file under the folder, in sorted file order."""

    name = "text"

    FILES = {"train": ("*.txt", "*.jsonl")}

    def _check_inputs(self) -> None:
        if self.raw_dir is None or not self.raw_dir.is_dir() or not self.files("train"):
            raise FileNotFoundError(f"{self.name}: input folder {self.raw_dir} must hold *.txt or *.jsonl files")

    def _records(self, split, bad):
        for path in self.files(split):
            if path.suffix == ".jsonl":
                for lineno, obj in read_jsonl(path, bad):
                    if not isinstance(obj.get("text"), str):
                        bad.add("malformed record", f"{path.name}:{lineno}: no text")
                        continue
                    yield f"{path.name}:{lineno}", Record((), "", obj["text"].strip(), id=f"{path.name}:{lineno}")
                continue
            docs = path.read_text(encoding="utf-8").split("\n\n")
            for i, doc in enumerate(d.strip() for d in docs):
                if doc:
                    yield f"{path.name}:{i}", Record((), "", doc, id=f"{path.name}:{i}")
