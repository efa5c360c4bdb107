"""User-given input files checked before a loader reads them, so a bad one is a one-line error naming it.

The command lines (`chat`, `evaluate`, `convert_weights.py`) call these on what the user named, then
load. The checks are cheap at any model size: a JSON file is parsed, a tokenizer is opened, a weights
file is checked for its container's own integrity marks (a torch zip archive's central directory, which
a truncated copy lacks; a safetensors header and the byte length it declares), never read whole.
`check_output_file` and `check_output_folder` check where an output file or folder will go.
`written_rows` reads back the JSONL output of an interrupted job that `--resume` continues.
`one_line` turns any remaining exception into the message a command line prints; `positive_int` is the
argparse type of counts (a batch size, a number of devices).
"""
from __future__ import annotations

import argparse
import json
import os
import zipfile
from pathlib import Path
from typing import Callable

from bmgpt_jax.convert.folder import FILES
from bmgpt_jax.convert.safetensors_io import SAFE_INDEX, SafetensorsFile


def check_json(path: str | Path) -> None:
    """ValueError naming `path` when it does not parse as JSON."""
    try:
        json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): truncated "
                         "or corrupt") from None


def check_tokenizer(path: str | Path) -> None:
    """ValueError naming `path` when it is not a SentencePiece model (or a folder holding exactly one)."""
    from bmgpt_jax.data.text import load_tokenizer
    try:
        load_tokenizer(str(path))
    except (FileNotFoundError, ValueError):           # load_tokenizer's own errors name the file
        raise
    except Exception as e:  # noqa: BLE001 -- anything else reading it (an OSError), named here
        raise ValueError(f"{path} is not a readable SentencePiece tokenizer model (truncated or corrupt): "
                         f"{one_line(e)}") from None


def check_weights(path: str | Path) -> None:
    """ValueError naming `path` when a weights file is empty or visibly truncated: a torch zip archive
    (`torch.save`'s format since 1.6) without a readable central directory, or a safetensors file whose
    header is corrupt or declares more bytes than the file has (`SafetensorsFile`). A legacy pickle
    `.pth` has no such mark and is left to the loader."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    size = p.stat().st_size
    if size == 0:
        raise ValueError(f"{p} is empty (0 bytes), not a weights file")
    with open(p, "rb") as f:
        head = f.read(8)
    if p.suffix == ".safetensors":
        SafetensorsFile(p).close()                     # the reader checks the header and the declared sizes
    elif head[:4] == b"PK\x03\x04":
        try:
            zipfile.ZipFile(p).close()
        except zipfile.BadZipFile as e:
            raise ValueError(f"{p} is truncated or corrupt ({size:,} bytes; a PyTorch zip checkpoint whose "
                             f"central directory cannot be read: {e})") from None


def check_model_folder(path: str | Path, flag: str | None = "--checkpoint") -> Path:
    """`path` as a model folder (`convert.folder`): it exists, holds its files, and each passes the checks
    above. Given a training run's folder instead, the error points at its `final/` model (and at the
    command line's `flag` for it)."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model folder {d} does not exist" if not d.exists() else f"{d} is not a folder")
    weights = [d / name for name in (FILES["weights"], SAFE_INDEX, FILES["pth"]) if (d / name).exists()]
    if not weights and (d / "final").is_dir():
        raise FileNotFoundError(f"{d} is a training run's folder; its model is {d / 'final'}"
                                + (f" ({flag} {d / 'final'})" if flag else ""))
    tokenizer = next((p for p in (d / FILES["tokenizer"], d / "tokenizer") if p.exists()), None)
    missing = ([] if weights else [f"{FILES['weights']} (or {SAFE_INDEX}, or {FILES['pth']})"]) + \
        [FILES[k] for k in ("lm", "esm") if not (d / FILES[k]).exists()] + ([] if tokenizer else [FILES["tokenizer"]])
    if missing:
        raise FileNotFoundError(f"{d} is not a model folder: it lacks {', '.join(missing)}")
    for key in ("lm", "esm", "gin"):
        if (d / FILES[key]).exists():
            check_json(d / FILES[key])
    check_tokenizer(tokenizer)
    if weights[0].name == SAFE_INDEX:
        check_json(weights[0])
        for shard in sorted(set(json.loads(weights[0].read_text()).get("weight_map", {}).values())):
            check_weights(d / shard)
    else:
        check_weights(weights[0])
    return d


def written_rows(path: str | Path, is_row: Callable[[dict], bool], what: str) -> list[dict]:
    """The complete rows of a JSONL file a job writes row by row (`chat --jsonl`, evaluate's predictions):
    each line a JSON object for which `is_row` holds. A torn last line (no newline after it: the job was
    killed while writing it) is dropped; any other line that is not such a row raises ValueError naming
    the file and the line, so `--resume` never appends to a file that is not its own."""
    lines = Path(path).read_text().split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not is_row(row):
                raise ValueError
        except ValueError:
            if i == len(lines):
                continue
            raise ValueError(f"{path} line {i} is not {what}; --resume appends only to such a file") from None
        rows.append(row)
    return rows


def check_output_file(path: str | Path, flag: str) -> None:
    """ValueError naming `path` (the command line's `flag`) when no file can be created there: it is a
    folder, or its folder does not exist. Checked before a model loads, so the run does not fail after
    minutes of loading."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder, not a file")
    if not p.parent.is_dir():
        raise ValueError(f"{flag} {p}: the folder {p.parent} does not exist")


def check_output_folder(path: str | Path, flag: str, probe: bool = True) -> None:
    """ValueError naming `path` (the command line's `flag`, or a config key such as `out_dir`) when no
    folder can be made there: it, or a folder above it, exists and is not a folder (a file); or (`probe`,
    on the process that writes there) it cannot be created or written in: no permission, a read-only
    disk, a name too long. The probe makes the missing folders and a file in the folder, then removes
    what it made, so a command refused later leaves nothing behind. One line with the system's reason,
    checked before a model loads or data is built, like `check_output_file`."""
    p = Path(path)
    label = f"{flag} {p}" if flag.startswith("-") else f"{flag}={p}"
    doing, made = "create", []
    try:
        for above in (p, *p.parents):
            if above.exists():
                if not above.is_dir():
                    raise ValueError(f"{label} is a file, not a folder" if above == p else
                                     f"{label}: {above} is a file, not a folder")
                break
            made.append(above)
        if probe:
            for folder in reversed(made):
                folder.mkdir()
            doing = "write in"
            (p / f".bmgpt_jax-write-check-{os.getpid()}").touch()
            (p / f".bmgpt_jax-write-check-{os.getpid()}").unlink()
    except OSError as e:
        raise ValueError(f"{label}: cannot {doing} it ({e.strerror or type(e).__name__})") from None
    finally:
        for folder in made if probe else ():            # deepest first; only those the probe made
            try:
                folder.rmdir()
            except OSError:
                pass


def check_not_url(path: str | Path, what: str) -> None:
    """ValueError when `path` is a URL (gs://, s3://, ...): the commands write their folders with file
    operations, and pathlib would quietly turn `gs://b/x` into a local folder `gs:/b/x`."""
    if "://" in str(path):
        raise ValueError(f"{what}={path} is a URL: the run writes its folders with file operations; mount the "
                         "bucket (e.g. gcsfuse) on every host and give the mount's path")


def one_line(error: BaseException) -> str:
    """An exception as one line: the first line of its message (a KeyError's without the quotes), or
    its type when it has none."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    lines = str(text).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse prints the usage line and this message, status 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value
