"""The common tfds builder: read files from a user-given folder, convert rows to `Record`s, check, write.

Subclasses name their files per split (`FILES`) and turn them into `(key, Record)` pairs (`_records`).
This base checks every record the way the pipeline will use it (SMILES featurize, residues are in the ESM
alphabet, the answer is not empty), skips and counts the bad ones per reason (`BadRecords`), reports them
at the end of each split (logged, and saved in the dataset's `metadata.json` under "bad_records") and
never aborts on a bad row. A missing folder or file is a `FileNotFoundError` listing what was expected.
A build records its raw files' fingerprints (`metadata.json` "raw_files"); a cached build read again with
a `raw_dir` whose files differ (a newer release, another folder) is a ValueError, not stale data, and one
with a `raw_dir` lacking some of them a FileNotFoundError naming them (the build is kept).

Output is array_record with text features only, read back without tensorflow:
`builder.as_data_source(split)[i]` -> dict, `Record.from_example(...)`. Each split is written straight to
its shards in generation order (`RecordBuilder._generate_splits`), not through tfds's writer, which holds a
split in memory up to 1 GiB and past that spills it to files through tensorflow (not installed): a split of
any size builds, in memory of one example.
"""
from __future__ import annotations

import abc
import functools
import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

from ..records import BadRecords, Record, features

KEEP_MULTI, SINGLE_ONLY = "keep", "single"
CHUNK = 1 << 16    # bytes of each end of a raw file its fingerprint reads
BOM = b"\xef\xbb\xbf"   # the UTF-8 byte-order mark some editors write first
SHARD_BYTES = 256 << 20   # serialized bytes after which a split's shard is closed and the next one begun
PROGRESS_SECONDS = 60.0   # a long build logs how far it got at most this often
log = logging.getLogger(__name__)


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of every bmgpt_jax builder: `raw_dir` holds the source files, `FILES[split]` names them."""

    VERSION = tfds.core.Version("1.0.0")
    FILES: dict[str, tuple[str, ...]] = {}
    EXTRA_FILES: tuple[str, ...] = ()          # needed by every split (e.g. an accession -> sequence map)

    def __init__(self, *, raw_dir: str | Path | None = None, **kwargs):
        self.raw_dir = Path(raw_dir) if raw_dir is not None else None
        self.bad_records: dict[str, BadRecords] = {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """None: no checksums file to find (and tfds' lookup needs `importlib_resources` on Python >= 3.9)."""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=features(),
                                     disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def expected_files(self) -> list[str]:
        return sorted({f for files in self.FILES.values() for f in files} | set(self.EXTRA_FILES))

    def _check_inputs(self) -> None:
        """FileNotFoundError naming the expected files when the folder or one of them is missing."""
        expected = self.expected_files()
        if self.raw_dir is None or not self.raw_dir.is_dir():
            raise FileNotFoundError(f"{self.name}: input folder {self.raw_dir} not found; it must contain "
                                    f"{', '.join(expected)}")
        missing = [f for f in expected if not any(self.raw_dir.glob(f))]
        if missing:
            raise FileNotFoundError(f"{self.name}: {self.raw_dir} lacks {', '.join(missing)} (expected "
                                    f"{', '.join(expected)})")

    def raw_fingerprint(self) -> dict[str, list]:
        """`{file: [size, digest]}` of the raw files this builder reads, the digest a sha256 of each file's
        first and last 64 KiB: cheap at any size, and it tells other raw files from the ones a build read."""
        out = {}
        for path in sorted({p for pat in self.expected_files() for p in self.raw_dir.glob(pat)}):
            size, digest = path.stat().st_size, hashlib.sha256()
            with open(path, "rb") as f:
                digest.update(f.read(CHUNK))
                f.seek(max(CHUNK, size - CHUNK))
                digest.update(f.read())
            out[str(path.relative_to(self.raw_dir))] = [size, digest.hexdigest()[:16]]
        return out

    def check_raw_files(self) -> None:
        """FileNotFoundError when `raw_dir` lacks raw files the build in `data_dir` was made from (named,
        with the folder: the build itself is fine); ValueError when `raw_dir` holds other raw files than
        the build was made from (another content, a file more), advising to delete the build. Nothing to
        compare without a `raw_dir` (the cache is then the data) or for a build that predates the
        fingerprints."""
        built = self.info.metadata.get("raw_files")
        if built is None or self.raw_dir is None or not self.raw_dir.is_dir():
            return
        now = self.raw_fingerprint()
        missing = sorted(set(built) - set(now))
        differ = sorted((set(now) - set(built)) | {f for f in set(now) & set(built) if now[f] != list(built[f])})
        if missing:
            raise FileNotFoundError(
                f"{self.name}: {self.raw_dir} lacks {len(missing)} of the {len(built)} raw files the dataset in "
                f"{self.data_dir} was built from ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                + (f", and {len(differ)} of its files differ ({', '.join(differ[:3])})" if differ else "")
                + "; give the folder that holds them, or none (no raw_dir, no --raw-dir) to read the build as it is")
        if differ:
            raise ValueError(f"{self.name}: the dataset in {self.data_dir} was built from other raw files than "
                             f"{self.raw_dir} holds now ({len(differ)} differ: {', '.join(differ[:3])}); delete "
                             f"{self.data_dir} to rebuild it from them")

    def check_split(self, split: str) -> None:
        """ValueError when `split` is one of `FILES` but the build holds no record of it: tfds cannot write
        an empty split, so `_split_generators` left it out, and tfds would only call it unknown. The error
        names the split, its files and the bad records the build counted (saved in `metadata.json`)."""
        if split not in self.FILES or split in self.info.splits:
            return
        files = ", ".join(self.FILES[split]) + (f" (in {self.raw_dir})" if self.raw_dir is not None else "")
        bad = self.info.metadata.get("bad_records", {}).get(split) or {}
        counts = {reason: info["count"] for reason, info in bad.items()}
        what = (f"all {sum(counts.values())} of {files} were bad "
                f"({', '.join(f'{r}: {n}' for r, n in counts.items())})" if counts else f"{files} held none")
        raise ValueError(f"{self.name}: split {split!r} has no record: {what}; see bad_records in "
                         f"{Path(self.data_dir) / 'metadata.json'}")

    def _split_generators(self, dl_manager):
        """One generator per split; a split without a single good record is left out (tfds cannot write
        an empty split), after its report (reading it is then `check_split`'s error)."""
        self._check_inputs()
        self.info.metadata["raw_files"] = self.raw_fingerprint()
        gens = {}
        for split in self.FILES:
            gen = self._generate_examples(split)
            first = next(gen, None)
            if first is not None:
                gens[split] = itertools.chain([first], gen)
        return gens

    def _generate_splits(self, dl_manager, download_config) -> list[tfds.core.SplitInfo]:
        """Every split of `_split_generators`, written by `_write_split` (tfds's own writer cannot write a
        split over 1 GiB without tensorflow); tfds then records the split infos as after its own writer."""
        return [self._write_split(split, examples) for split, examples in self._split_generators(dl_manager).items()]

    def _write_split(self, split: str, examples) -> tfds.core.SplitInfo:
        """`examples` serialized as tfds does and written in their order to array_record shards of about
        `SHARD_BYTES` each, under the names and with the split info tfds's reader expects. Shards are named
        `-NNNNN-of-NNNNN` once their count is known; until then they are `{prefix}.part{i}`. A build
        longer than `PROGRESS_SECONDS` logs the examples and bytes written so far at that interval."""
        template = self._get_filename_template(split_name=split)
        lengths, sizes, writer = [], [], None
        shown = time.monotonic()
        for _, example in examples:
            if time.monotonic() - shown >= PROGRESS_SECONDS:
                shown = time.monotonic()
                log.info("%s %s: %s examples written so far (%.1f MB)", self.info.full_name, split,
                         f"{sum(lengths):,}", sum(sizes) / 1e6)
            data = self.info.features.serialize_example(example)
            if writer is None:
                writer = ArrayRecordWriter(f"{template.filepath_prefix()}.part{len(lengths)}", "group_size:1")
                lengths.append(0)
                sizes.append(0)
            writer.write(data)
            lengths[-1] += 1
            sizes[-1] += len(data)
            if sizes[-1] >= SHARD_BYTES:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()
        for i in range(len(lengths)):
            os.replace(f"{template.filepath_prefix()}.part{i}",
                       template.sharded_filepath(shard_index=i, num_shards=len(lengths)))
        return tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=sum(sizes),
                                   filename_template=template)

    def files(self, split: str) -> list[Path]:
        """The files of `split` (patterns expanded, sorted)."""
        return [p for pat in self.FILES[split] for p in sorted(self.raw_dir.glob(pat))]

    @abc.abstractmethod
    def _records(self, split: str, bad: BadRecords) -> Iterator[tuple[str, Record]]:
        """`(unique key, Record)` for every readable row of `split`; unreadable rows go to `bad`."""

    def _generate_examples(self, split: str):
        bad = self.bad_records[split] = BadRecords()
        for key, record in self._records(split, bad):
            reason = check_record(record, multi=getattr(self.builder_config, "name", KEEP_MULTI) == KEEP_MULTI)
            if reason:
                bad.add(reason, f"{key}: {record.entities or record.question[:80]!r}")
                continue
            yield key, record.to_example()
        self.info.metadata.setdefault("bad_records", {})[split] = bad.as_dict()
        bad.report(f"{self.info.full_name} {split}")


def check_record(record: Record, multi: bool = True) -> str | None:
    """The reason `record` is unusable, or None: empty answer, invalid SMILES, bad residues, several entities."""
    if not record.answer.strip():
        return "empty answer"
    if not multi and len(record.entities) > 1:
        return "multiple entities"
    for kind, value in record.entities:
        if not _entity_ok(kind, value):
            return "invalid SMILES" if kind == "molecule" else "bad residues"
    return None


@functools.lru_cache(maxsize=65536)
def _entity_ok(kind: str, value: str) -> bool:
    """Whether the pipeline can encode the entity: SMILES featurizes, residues are in the ESM alphabet."""
    from .. import molecules, proteins
    try:
        (molecules.featurize if kind == "molecule" else proteins.encode)(value)
    except ValueError:
        return False
    return True


def decode(data: bytes, where: str, offset: int = 0) -> str:
    """`data` as UTF-8 text; bytes that are not are a ValueError naming `where` (the file, and the line when
    known) and the file's byte (`offset`: where `data` starts in it), which Python's own error names neither."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte {offset + e.start})") from None


def read_text(path: Path) -> str:
    """The whole file as text, as `open(path, encoding="utf-8-sig").read()` gives it (a leading byte-order
    mark dropped, \\r\\n and \\r read as \\n), with `decode`'s error where it is not UTF-8."""
    data = path.read_bytes()
    body = data.removeprefix(BOM)
    return decode(body, str(path), len(data) - len(body)).replace("\r\n", "\n").replace("\r", "\n")


def raw_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """`(line number, byte offset, bytes)` per line, split where text mode splits (\\n, \\r\\n, a lone \\r;
    endings kept) and the byte-order mark dropped, left for the caller to `decode`: a line that is not UTF-8
    is then one bad record (JSONL) or the file's error at that line (TSV), not a traceback naming no file."""
    lineno = offset = 0
    with open(path, "rb") as f:
        for chunk in f:                                   # each chunk ends at a \n (or the file's end)
            for line in chunk.splitlines(keepends=True):
                lineno, start, offset = lineno + 1, offset, offset + len(line)
                if lineno == 1 and line.startswith(BOM):
                    line, start = line[len(BOM):], start + len(BOM)
                yield lineno, start, line


JSON_TYPES = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


def read_json(path: Path, kind: type, what: str):
    """A whole-file JSON document whose top level is a `kind` (dict or list; `what` describes it for the
    error); a file that is not UTF-8, does not parse or holds another type is one ValueError naming it."""
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, kind):
        raise ValueError(f"{path}: expected {what}, got a JSON {JSON_TYPES.get(type(doc), type(doc).__name__)}")
    return doc


def all_str(*values) -> bool:
    """Whether every value is a string: JSON may hold any type (null, a number, a list) where a record's
    text or entity is due, which is a malformed record, not a TypeError further on."""
    return all(isinstance(v, str) for v in values)


def read_jsonl(path: Path, bad: BadRecords) -> Iterator[tuple[int, dict]]:
    """`(line number, object)` per JSON line; malformed lines (not UTF-8, not JSON, not an object) are counted
    in `bad` as "malformed JSON line" and skipped."""
    for lineno, start, raw in raw_lines(path):
        try:
            line = decode(raw, f"{path.name}:{lineno}", start)
        except ValueError as e:
            bad.add("malformed JSON line", str(e))
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            bad.add("malformed JSON line", f"{path.name}:{lineno}: {line.strip()}")
            continue
        yield lineno, obj
