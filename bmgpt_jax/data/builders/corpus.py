"""Plain-text corpus for stage-1 language-model training: `*.txt` (documents separated by blank lines)
and `*.jsonl` (one `{"text": ...}` a line) files in a folder, as records with no question (`is_plain_text`).

A document longer than `MAX_CHARS` is cut into pieces at whitespace (about 1,000 Llama tokens of English
each), so the pipeline's largest bucket does not truncate away most of a long document (text with fewer
characters a token, SMILES or non-Latin scripts, can still exceed it: the pipeline counts what it cuts).
Files are read a line at a time (`documents`), so a build holds one document, not a whole file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ..records import Record
from .base import RecordBuilder, decode, raw_lines, read_jsonl

MAX_CHARS = 4000


def chunks(text: str, limit: int = MAX_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, cut at the last whitespace before the limit."""
    text = text.strip()
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit + 1)
        cut = cut if cut > 0 else limit
        yield text[:cut].strip()
        text = text[cut:].strip()
    if text:
        yield text


def documents(path: Path) -> Iterator[str]:
    """The documents of a `.txt` file, exactly `read_text(path).split("\\n\\n")` (the same UTF-8 error, the
    byte-order mark dropped, \\r\\n and \\r read as \\n; three blank lines make an empty document) but
    streamed: a document ends where an empty line follows a line ending, so only the current one is held."""
    doc, ends_line = [], False
    for _, start, raw in raw_lines(path):
        line = decode(raw, str(path), start).replace("\r\n", "\n").replace("\r", "\n")
        if line == "\n" and ends_line:
            yield "".join(doc)[:-1]
            doc, ends_line = [], False
        else:
            doc.append(line)
            ends_line = line.endswith("\n")
    yield "".join(doc)


class TextCorpus(RecordBuilder, skip_registration=True):
    """Every document of every `*.txt` / `*.jsonl` file under the folder, in sorted file order."""

    name = "text"
    FILES = {"train": ("*.txt", "*.jsonl")}

    def _check_inputs(self) -> None:
        if self.raw_dir is None or not self.raw_dir.is_dir() or not self.files("train"):
            raise FileNotFoundError(f"{self.name}: input folder {self.raw_dir} must hold *.txt or *.jsonl files")

    def _documents(self, split, bad) -> Iterator[tuple[str, str]]:
        for path in self.files(split):
            if path.suffix == ".jsonl":
                for lineno, obj in read_jsonl(path, bad):
                    if isinstance(obj.get("text"), str):
                        yield f"{path.name}:{lineno}", obj["text"]
                    else:
                        bad.add("malformed record", f"{path.name}:{lineno}: no text")
            else:
                for i, doc in enumerate(documents(path)):
                    yield f"{path.name}:{i}", doc

    def _records(self, split, bad):
        for key, doc in self._documents(split, bad):
            for j, piece in enumerate(chunks(doc)):
                yield f"{key}:{j}", Record((), "", piece, id=f"{key}:{j}")
