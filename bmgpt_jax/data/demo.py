"""The embedded demo set: molecule QA made on the fly from the 4,999 NCI SMILES that the rdkit wheel ships.

Every answer is computed by RDKit (formula, weight, rings, H-bond donors/acceptors, logP, TPSA ...), so
the set is exact, needs no download and is the same on every machine. Each molecule gets every question
in `QUESTIONS`; `demo_records()` lists them molecule by molecule, in file order.

Splits: `train` is lines 1-4,499 of the file, `test` the last 500 lines (from `TEST_FIRST_LINE`) less the
molecules that also occur among the train lines (same canonical SMILES), so `demo:test` holds molecules
training never sees; the demo tokenizer is trained on the train split's text only.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

from .molecules import featurize_mol
from .records import BadRecords, Record


def _props() -> tuple[tuple[str, str, Callable], ...]:
    from rdkit.Chem import Crippen, Descriptors, Lipinski, rdMolDescriptors as rd
    return (
        ("What is the molecular formula of this molecule?", "The molecular formula is {}.", rd.CalcMolFormula),
        ("What is the molecular weight of this molecule?", "The molecular weight is {:.2f} g/mol.",
         Descriptors.MolWt),
        ("How many rings does this molecule have?", "It has {} ring(s).", rd.CalcNumRings),
        ("How many aromatic rings does this molecule have?", "It has {} aromatic ring(s).",
         rd.CalcNumAromaticRings),
        ("How many hydrogen bond donors does this molecule have?", "It has {} hydrogen bond donor(s).",
         Lipinski.NumHDonors),
        ("How many hydrogen bond acceptors does this molecule have?", "It has {} hydrogen bond acceptor(s).",
         Lipinski.NumHAcceptors),
        ("What is the logP of this molecule?", "The Crippen logP is {:.2f}.", Crippen.MolLogP),
        ("What is the topological polar surface area of this molecule?", "The TPSA is {:.2f} square angstroms.",
         rd.CalcTPSA),
        ("How many rotatable bonds does this molecule have?", "It has {} rotatable bond(s).",
         rd.CalcNumRotatableBonds),
        ("How many heavy atoms does this molecule have?", "It has {} heavy atom(s).", Lipinski.HeavyAtomCount),
    )


QUESTIONS: tuple[str, ...] = tuple(q for q, _, _ in _props())
SPLITS = ("train", "test")
TEST_FIRST_LINE = 4500


def nci_smiles_path() -> str:
    """`rdkit/Data/NCI/first_5K.smi` inside the installed rdkit (lines of `SMILES<TAB>id`)."""
    from rdkit import RDConfig
    return os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")


def demo_records(max_molecules: int | None = None, split: str = "train") -> DemoRecords:
    """`len(QUESTIONS)` records per parseable NCI molecule of `split` (its first `max_molecules` lines, or all).

    Unparseable SMILES (and, in `test`, molecules also in `train`) are skipped and reported (`BadRecords`);
    an unknown split is a KeyError naming the valid ones. The result is cached per process.
    """
    if split not in SPLITS:
        raise KeyError(f"demo has no split {split!r}; splits: {', '.join(SPLITS)}")
    return _demo_records(max_molecules, split)


def _lines(split: str, max_molecules: int | None):
    """(line number, SMILES, NCI id) of `split`'s lines, the first `max_molecules` of them."""
    first, last = (1, TEST_FIRST_LINE - 1) if split == "train" else (TEST_FIRST_LINE, None)
    if max_molecules is not None:
        last = first + max_molecules - 1 if last is None else min(last, first + max_molecules - 1)
    with open(nci_smiles_path(), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if last is not None and lineno > last:
                break
            if lineno >= first:
                smiles, _, nci_id = line.strip().partition("\t")
                yield lineno, smiles, nci_id


@functools.lru_cache(maxsize=1)
def _train_molecules() -> frozenset[str]:
    """Canonical SMILES of every parseable molecule on the train lines."""
    from rdkit import Chem
    mols = (Chem.MolFromSmiles(s) for _, s, _ in _lines("train", None))
    return frozenset(Chem.MolToSmiles(m) for m in mols if m is not None)


class DemoRecords(tuple):
    """The records of a demo split and `bad_records` (`{reason: {"count", "examples"}}`, as a build's
    `metadata.json` holds them): the records an unparseable molecule would have given, `len(QUESTIONS)`
    each, so evaluation counts them as skipped. A test molecule also in `train` is not of the split."""
    bad_records: dict = {}


@functools.lru_cache(maxsize=4)
def _demo_records(max_molecules: int | None, split: str) -> DemoRecords:
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")
    props = _props()
    bad = BadRecords()
    out = []
    for lineno, smiles, nci_id in _lines(split, max_molecules):
        mol = Chem.MolFromSmiles(smiles)
        try:
            if mol is None:
                raise ValueError("rdkit cannot parse it")
            featurize_mol(mol, smiles)              # what the GIN cannot embed is no demo either
        except ValueError:
            bad.add("invalid SMILES", f"line {lineno}: {smiles}")
            continue
        if split == "test" and Chem.MolToSmiles(mol) in _train_molecules():
            bad.add("also in the train split", f"line {lineno}: {smiles}")
            continue
        for question, template, fn in props:
            out.append(Record((("molecule", smiles),), question, template.format(fn(mol)), id=f"NCI{nci_id}"))
    bad.report(f"demo set {split} (rdkit NCI first_5K.smi)")
    records = DemoRecords(out)
    records.bad_records = {reason: {"count": info["count"] * len(props), "examples": info["examples"]}
                           for reason, info in bad.as_dict().items() if reason != "also in the train split"}
    return records


def demo_texts(max_molecules: int | None = None) -> list[str]:
    """The questions and answers of the demo train split: the text a demo tokenizer is trained on."""
    recs = demo_records(max_molecules)
    return sorted(set(QUESTIONS)) + [r.answer for r in recs]
