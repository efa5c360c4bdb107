"""One record -> one encoded example (host, numpy), and encoded examples -> one fixed-shape batch.

`encode_example` is the slow, per-example part the pipeline runs in worker processes: prompt building
and tokenization, molecule featurization (rdkit) and protein tokenization; an example it cannot use comes
back as one of `DROP_REASONS`. `collate` assembles the batch of docs/batch_format.md for one sequence
bucket `T` and the graph/protein budgets, one example a row or several packed end to end. `repad` widens
a batch to a longer bucket (hosts of a multi-host run agree on the longest of their buckets each step).
`check_ids` refuses a batch holding an id outside its vocabulary before it reaches a jitted step (where it
would turn into NaNs).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

from . import molecules, proteins
from .records import Record
from .text import Tokenizer, encode_record

# Why the pipeline leaves an example out -> what would keep it (named in reports and errors).
DROP_REASONS = {
    "invalid_smiles": "the data: SMILES that rdkit or the GIN featurization cannot read",
    "bad_residues": "the data: residues outside the ESM alphabet",
    "too_many_atoms": "model.gin.max_atoms (null: no cap), or model.gin.over_cap: subsample",
    "too_long": "data.seq_buckets: a larger last bucket",
    "over_node_budget": "data.node_budget",
    "over_edge_budget": "data.edge_budget",
    "over_graph_budget": "data.graph_budget",
    "over_protein_budget": "data.protein_budget",
}


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """What `encode_example` needs besides the tokenizer (a picklable slice of DataConfig)."""
    system_prompt: str
    max_len: int                 # longest bucket: QA beyond it is rejected, plain text is cut to it
    max_atoms: int | None        # the GIN's atom cap (GinConfig.max_atoms / over_cap; None: every atom)
    over_cap: str                # "subsample" | "error" (the example is dropped)
    max_protein_len: int


@dataclasses.dataclass
class Encoded:
    """One example: `input_ids`/`loss_mask` [t]; per molecule `(atoms, edge_index, bonds, node_pos)` with
    node_pos [n_atoms] the sequence position of each node's slot (-1: subsampled away); per protein
    `(esm_ids [l], start)`; `cut`: plain-text tokens cut away at the longest bucket."""
    input_ids: np.ndarray
    loss_mask: np.ndarray
    mols: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    prots: list[tuple[np.ndarray, int]]
    cut: int = 0

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def budget(self) -> tuple[int, int, int, int]:
        """(nodes, edges, graphs, proteins) this example adds to a batch."""
        return (sum(len(m[0]) for m in self.mols), sum(m[1].shape[1] for m in self.mols), len(self.mols),
                len(self.prots))


def encode_example(tok: Tokenizer, record: Record, opt: EncodeOptions) -> Encoded | str:
    """`record` encoded, or the reason it cannot be used (a key of `DROP_REASONS`, counted by the pipeline)."""
    feats, kept, esm, lengths = [], [], [], []
    for kind, value in record.entities:
        try:
            if kind == "molecule":
                f = molecules.featurize(value)
                if opt.max_atoms is not None and len(f[0]) > opt.max_atoms and opt.over_cap == "error":
                    return "too_many_atoms"
                feats.append(f)
                kept.append(molecules.kept_atoms(len(f[0]), opt.max_atoms, "subsample", value))
                lengths.append(len(kept[-1]))
            else:
                with warnings.catch_warnings():       # truncation to max_protein_len is intended
                    warnings.simplefilter("ignore", UserWarning)
                    ids, mask = proteins.tokenize([value], max_length=opt.max_protein_len)
                esm.append(ids[0, : mask[0].sum()])
                lengths.append(len(esm[-1]))
        except ValueError:
            return "invalid_smiles" if kind == "molecule" else "bad_residues"
    enc = encode_record(tok, record, lengths, opt.system_prompt, max_len=opt.max_len)
    if len(enc.input_ids) > opt.max_len:
        return "too_long"
    mols, prots = [], []
    mi, pi = iter(zip(feats, kept)), iter(esm)
    for (kind, _), start in zip(record.entities, enc.slot_starts):
        if kind == "molecule":
            (atoms, edge_index, bonds), keep = next(mi)
            node_pos = np.full(len(atoms), -1, np.int32)
            node_pos[keep] = start + np.arange(len(keep), dtype=np.int32)
            mols.append((atoms, edge_index, bonds, node_pos))
        else:
            prots.append((next(pi), start))
    return Encoded(enc.input_ids, enc.loss_mask, mols, prots, enc.cut)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Per-host batch shape: `batch` rows; graph budget `nodes`/`edges`/`graphs` (padding graph included);
    `proteins` rows of ESM tokens."""
    batch: int
    nodes: int
    edges: int
    graphs: int
    proteins: int

    def exceeded(self, used: tuple[int, int, int, int], add: tuple[int, int, int, int], rows: int) -> str | None:
        """The first budget that `add` (nodes, edges, graphs, proteins) breaks on top of `used` in a batch of
        `rows` rows ("rows", "node", "edge", "graph", "protein"), or None when it fits."""
        n, e, g, p = (u + a for u, a in zip(used, add))
        checks = (("rows", rows < self.batch), ("node", n < self.nodes), ("edge", e <= self.edges),
                  ("graph", g < self.graphs), ("protein", p <= self.proteins))
        return next((name for name, ok in checks if not ok), None)

    def fits(self, used: tuple[int, int, int, int], add: tuple[int, int, int, int], rows: int) -> bool:
        return self.exceeded(used, add, rows) is None


def collate(rows: Sequence[Encoded] | Sequence[Sequence[Encoded]], T: int, budget: Budget, prot_len: int, *,
            packed: bool = False) -> dict[str, np.ndarray]:
    """The batch dict of docs/batch_format.md: `B = budget.batch` rows of `T`, graphs padded to the budget,
    `P = budget.proteins` proteins of `prot_len` tokens. Rows beyond `len(rows)` are all padding.

    `rows` holds one example per row, or with `packed` a list of examples per row laid end to end; the
    batch then has `segment_ids [B, T]` as well (1, 2, ... for the examples of a row, 0 on padding), from
    which the decoder restarts positions and keeps attention inside each example. Packed, an example's
    first token must carry no loss: it would be predicted from the example before it."""
    B = budget.batch
    input_ids = np.zeros((B, T), np.int32)
    segment = np.zeros((B, T), np.int32)
    loss = np.zeros((B, T), np.int32)
    feats, slots = [], []
    prot_ids = np.full((budget.proteins, prot_len), proteins.PAD_ID, np.int32)
    prot_mask = np.zeros((budget.proteins, prot_len), np.int32)
    prot_slot = np.full((budget.proteins, prot_len), -1, np.int32)
    k = 0
    for b, row in enumerate(rows if packed else [[ex] for ex in rows]):
        t0 = 0
        for s, ex in enumerate(row, 1):
            t1 = t0 + ex.length
            if t1 > T:
                raise ValueError(f"collate: row {b} holds {t1} or more positions, more than T = {T}")
            if packed and ex.loss_mask[0]:
                raise ValueError(f"collate: packed example {s} of row {b} has loss on its first token")
            input_ids[b, t0:t1], loss[b, t0:t1], segment[b, t0:t1] = ex.input_ids, ex.loss_mask, s
            for atoms, edge_index, bonds, node_pos in ex.mols:
                feats.append((atoms, edge_index, bonds))
                slots.append(np.where(node_pos >= 0, b * T + t0 + node_pos, -1))
            for ids, start in ex.prots:
                n = len(ids)
                prot_ids[k, :n], prot_mask[k, :n] = ids, 1
                prot_slot[k, :n] = b * T + t0 + start + np.arange(n)
                k += 1
            t0 = t1
    g = molecules.batch_graphs(feats, n_node=budget.nodes, n_edge=budget.edges, n_graph=budget.graphs)
    mol_slot = np.full(budget.nodes, -1, np.int32)
    mol_node_mask = np.zeros(budget.nodes, np.int32)
    if slots:
        flat = np.concatenate(slots)
        mol_slot[:len(flat)] = flat
        mol_node_mask[:len(flat)] = 1
    out = {"input_ids": input_ids, "attention_mask": (segment > 0).astype(np.int32), "loss_mask": loss,
           "mol_atoms": np.asarray(g.nodes, np.int32), "mol_bonds": np.asarray(g.edges, np.int32),
           "mol_senders": np.asarray(g.senders, np.int32), "mol_receivers": np.asarray(g.receivers, np.int32),
           "mol_n_node": np.asarray(g.n_node, np.int32), "mol_n_edge": np.asarray(g.n_edge, np.int32),
           "mol_node_mask": mol_node_mask, "mol_slot": mol_slot, "prot_ids": prot_ids, "prot_mask": prot_mask,
           "prot_slot": prot_slot}
    if packed:
        out["segment_ids"] = segment
    return out


def repad(batch: dict[str, np.ndarray], T: int, prot_len: int) -> dict[str, np.ndarray]:
    """`batch` widened to `T` positions and `prot_len` ESM tokens, slot indices `b*T0+t` moved to `b*T+t`.
    A text-only batch (the `lm` stage keeps the text keys) has only its text keys widened."""
    B, T0 = batch["input_ids"].shape
    if (T0, batch["prot_ids"].shape[1] if "prot_ids" in batch else prot_len) == (T, prot_len):
        return batch
    out = dict(batch)
    for key in ("input_ids", "attention_mask", "loss_mask", "segment_ids"):
        if key in batch:
            out[key] = np.pad(batch[key], ((0, 0), (0, T - T0)))
    if "prot_ids" in batch:
        widen = ((0, 0), (0, prot_len - batch["prot_ids"].shape[1]))
        out["prot_ids"] = np.pad(batch["prot_ids"], widen, constant_values=proteins.PAD_ID)
        out["prot_mask"] = np.pad(batch["prot_mask"], widen)
        out["prot_slot"] = np.pad(batch["prot_slot"], widen, constant_values=-1)
    for key in ("mol_slot", "prot_slot"):
        if key in out:
            s = out[key]
            out[key] = np.where(s >= 0, (s // T0) * T + s % T0, -1).astype(np.int32)
    return out


def check_ids(batch: dict[str, np.ndarray], vocab_size: int, esm_vocab_size: int | None = None,
              where: str = "batch") -> None:
    """Raise ValueError naming `where`, the key, the position and the value of the first id outside its
    table: `input_ids` in [0, vocab_size), `prot_ids` in [0, esm_vocab_size) (when given), the molecule
    features in the GIN's embedding tables. Host numpy, any leading axes (micro-batches)."""
    tables = [("input_ids", None, vocab_size, "model.lm.vocab_size"),
              ("mol_atoms", 0, molecules.NUM_ATOM_TYPES, "GIN atom types"),
              ("mol_atoms", 1, molecules.NUM_CHIRALITY, "GIN chirality tags"),
              ("mol_bonds", 0, molecules.NUM_BOND_TYPES, "GIN bond types"),
              ("mol_bonds", 1, molecules.NUM_BOND_DIRS, "GIN bond directions")]
    if esm_vocab_size is not None:
        tables.append(("prot_ids", None, esm_vocab_size, "model.esm.vocab_size"))
    for key, column, size, name in tables:
        if key not in batch:
            continue
        ids = np.asarray(batch[key]) if column is None else np.asarray(batch[key])[..., column]
        bad = (ids < 0) | (ids >= size)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            col = "" if column is None else f", column {column}"
            raise ValueError(f"{where}: {key}{list(pos)}{col} = {int(ids[pos])} is outside [0, {size}) ({name}); "
                             f"{int(bad.sum())} such id(s) in the batch")
