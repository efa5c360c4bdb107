"""ESM-2 tokenizer: the 33-token ESM alphabet, `<cls>` ... `<eos>` framing, truncation and padding.

Ids are identical to transformers' `EsmTokenizer` built from the ESM-2 `vocab.txt` (which is `ALPHABET`,
one token a line), called with `truncation=True, max_length=max_length, padding=True`. Unlike it, a letter
outside the alphabet is an error here (HF maps it silently to `<unk>`), and so is an empty sequence.

    ids, mask = tokenize(["MKTAYIAK", "MSL"])    # ids [2, 10] int32: <cls> M K ... <eos> <pad>...
"""
from __future__ import annotations

import re
import warnings
from typing import Literal, Sequence

import numpy as np

# The ESM-2 vocabulary in id order (facebook/esm2_* vocab.txt).
ALPHABET: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
)
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(ALPHABET)}
CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = (TOKEN_TO_ID[t] for t in ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>"))

# One residue letter, or a whole bracketed token such as `<mask>` (as HF's tokenizer also accepts).
_PIECE = re.compile(r"<[^<>\s]*>|.", re.DOTALL)


class SequenceTooLongError(ValueError):
    """A sequence longer than `max_length - 2` residues with `overflow="error"`."""


def encode(sequence: str, identifier: str = "sequence") -> list[int]:
    """Residue ids of one sequence, without `<cls>`/`<eos>`.

    Raises ValueError for an empty sequence or a piece outside the alphabet, naming the piece, its
    1-based character position and `identifier`.
    """
    if not isinstance(sequence, str):
        raise TypeError(f"{identifier}: expected a str, got {type(sequence).__name__}")
    if not sequence:
        raise ValueError(f"{identifier}: empty protein sequence")
    ids = []
    for m in _PIECE.finditer(sequence):
        tok = m.group()
        tid = TOKEN_TO_ID.get(tok)
        if tid is None:
            raise ValueError(f"{identifier}: residue {tok!r} at position {m.start() + 1} is not in the ESM "
                             f"alphabet (valid letters: {''.join(t for t in ALPHABET if len(t) == 1)})")
        ids.append(tid)
    return ids


def tokenize(sequences: Sequence[str], max_length: int = 1024, ids: Sequence[str] | None = None, *,
             pad_to: int | None = None, overflow: Literal["truncate", "error"] = "truncate"
             ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize protein sequences into right-padded ESM-2 inputs.

    Args:
      sequences: `B` amino-acid strings (one-letter codes, upper case; `<mask>` etc. allowed).
      max_length: most tokens per sequence, `<cls>` and `<eos>` included; longer sequences keep their
        first `max_length - 2` residues (ESM-2 was trained on 1022 + 2).
      ids: `B` identifiers used in error and truncation messages (default: `#0`, `#1`, ...).
      pad_to: pad every row to this many tokens (default: the longest row after truncation).
      overflow: "truncate" (warn with a `UserWarning` naming the truncated sequences) or "error"
        (raise `SequenceTooLongError`).

    Returns:
      `(input_ids, attention_mask)`, both int32 `[B, L]`: `<cls>` residues `<eos>` then `<pad>` (1),
      attention 1 on `<cls>` ... `<eos>`.
    """
    if isinstance(sequences, str):
        raise TypeError("tokenize expects a list of sequences, got a single str; wrap it in a list")
    sequences = list(sequences)
    if not sequences:
        raise ValueError("tokenize: no sequences given")
    names = [f"#{i}" for i in range(len(sequences))] if ids is None else [str(i) for i in ids]
    if len(names) != len(sequences):
        raise ValueError(f"tokenize: {len(sequences)} sequences but {len(names)} ids")
    if max_length < 3:
        raise ValueError(f"tokenize: max_length={max_length} leaves no room for a residue")
    if overflow not in ("truncate", "error"):
        raise ValueError(f"tokenize: overflow={overflow!r} is not one of 'truncate', 'error'")
    keep = max_length - 2
    rows, truncated = [], []
    for seq, name in zip(sequences, names):
        res = encode(seq, name)
        if len(res) > keep:
            if overflow == "error":
                raise SequenceTooLongError(f"{name}: {len(res)} residues exceed max_length={max_length} "
                                           f"({keep} residues + <cls> + <eos>)")
            truncated.append(f"{name} ({len(res)})")
            res = res[:keep]
        rows.append([CLS_ID, *res, EOS_ID])
    if truncated:
        warnings.warn(f"tokenize: truncated {len(truncated)} sequence(s) to {keep} residues: "
                      f"{', '.join(truncated)}", UserWarning, stacklevel=2)
    longest = max(len(r) for r in rows)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"tokenize: pad_to={pad_to} is shorter than the longest row ({longest} tokens)")
    input_ids = np.full((len(rows), width), PAD_ID, dtype=np.int32)
    attention_mask = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = r
        attention_mask[i, :len(r)] = 1
    return input_ids, attention_mask


def write_vocab(path) -> None:
    """Write `ALPHABET` as an ESM `vocab.txt` (one token a line), loadable by `EsmTokenizer`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(ALPHABET))


def read_sequences_tsv(path, column: str = "sequence", id_column: str = "accession") -> tuple[list[str], list[str]]:
    """`(sequences, identifiers)` from a tab-separated file with a header (e.g. the Swiss-Prot sample)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if column not in header or id_column not in header:
            raise KeyError(f"{path}: columns {column!r}/{id_column!r} not in header {header}")
        ci, ii = header.index(column), header.index(id_column)
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [r[ci] for r in rows], [r[ii] for r in rows]
