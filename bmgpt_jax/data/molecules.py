"""SMILES -> GIN graph features (rdkit), and many molecules -> one padded `jraph.GraphsTuple`.

Featurization is exactly OpenBioMed's `MolGraphFeaturizer` with the `BaseGNN` settings that BioMedGPT
uses (itself the pretrain-gnns / GraphMVP "simple" scheme), so pretrained GIN weights see the inputs
they were trained on:

- atoms `[n_atoms, 2]`: `[atomic_num - 1, chirality]`; an atom outside 1..118 (the `*` dummy atom,
  atomic number 0) is the "misc" row 118. Chirality is the index in (CHI_UNSPECIFIED,
  CHI_TETRAHEDRAL_CW, CHI_TETRAHEDRAL_CCW).
- bonds `[n_edges, 2]`: `[type, direction]`, type in (SINGLE, DOUBLE, TRIPLE, AROMATIC), direction in
  (NONE, ENDUPRIGHT, ENDDOWNRIGHT); each bond gives two edges, `(i, j)` then `(j, i)`, in rdkit bond
  order; no self-loops (the GIN adds them).

What the reference cannot encode is a `ValueError` naming the SMILES: CHI_OTHER (the reference's
list index is 3, but its chirality table has 3 rows, so torch fails with an IndexError) and the newer
rdkit tags (square planar, ...; not in the list), bond types outside the four (dative, ...; the
reference's `list.index` raises), other bond directions (wedges come only from mol blocks), an
unparsable SMILES, an empty string and a molecule with zero atoms.

Batching: `batch_graphs` concatenates molecules in list order (node order = concatenation order) and
pads with `jraph.pad_with_graphs` to node/edge/graph budgets taken from a ladder of bucket sizes, so a
jitted encoder compiles once per bucket. jraph (and with it JAX) is imported by the batching functions
only, so spawned featurization workers start in a fraction of a second.
"""
from __future__ import annotations

import multiprocessing
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import rdqueries

if TYPE_CHECKING:
    import jraph

RDLogger.DisableLog("rdApp.*")

Featurized = tuple[np.ndarray, np.ndarray, np.ndarray]  # atoms [n,2], edge_index [2,e], bonds [e,2]

NUM_ATOM_TYPES = 120     # 118 elements, "misc" (118), mask token (119)
NUM_CHIRALITY = 3
NUM_BOND_TYPES = 6       # single, double, triple, aromatic, self-loop (4), mask (5)
NUM_BOND_DIRS = 3
MISC_ATOM = 118
CARBON_ROW = 5           # atomic number 6
SELF_LOOP_BOND = 4

_CHIRALITY = {Chem.ChiralType.CHI_UNSPECIFIED: 0, Chem.ChiralType.CHI_TETRAHEDRAL_CW: 1,
              Chem.ChiralType.CHI_TETRAHEDRAL_CCW: 2}
_BOND_TYPE = {Chem.BondType.SINGLE: 0, Chem.BondType.DOUBLE: 1, Chem.BondType.TRIPLE: 2,
              Chem.BondType.AROMATIC: 3}
_BOND_DIR = {Chem.BondDir.NONE: 0, Chem.BondDir.ENDUPRIGHT: 1, Chem.BondDir.ENDDOWNRIGHT: 2}


def _one_atom_query(atom_query: Chem.QueryAtom) -> Chem.Mol:
    """A query molecule of one atom, for `_atoms_matching`."""
    query = Chem.RWMol()
    query.AddAtom(atom_query)
    return query.GetMol()


# Bulk checks, one C++ pass over a molecule each and exact for any rdkit Mol (parsed from SMILES or a mol
# block, built by hand). A one-atom query's substructure matches are exactly the atoms it matches (each
# once; no cap: rdkit's default stops at 1000 matches): atoms that are not carbon, atoms whose chiral
# tag is not CHI_UNSPECIFIED (rdkit's queryAtomHasChiralTag). _OTHER_BOND_TYPE matches where some bond's
# type is none of the four: each SMARTS bond primitive is rdkit's BondOrder query (int(GetBondType())
# == 1 / 2 / 3 / 12) and `*` matches every atom, the dummy atom included.
_EVERY_MATCH = Chem.SubstructMatchParameters()
_EVERY_MATCH.uniquify, _EVERY_MATCH.maxMatches = False, 2**32 - 1
_NOT_CARBON = _one_atom_query(rdqueries.AtomNumEqualsQueryAtom(6, negate=True))
_CHIRAL_TAGGED = _one_atom_query(rdqueries.HasChiralTagQueryAtom())
_OTHER_BOND_TYPE = Chem.MolFromSmarts("*!-!=!#!:*")
# GetBondTypeAsDouble is ambiguous (DATIVE = SINGLE = 1.0, ONEANDAHALF = AROMATIC = 1.5) and raises for
# some types (OTHER, THREECENTER, ...), so it is read only after _OTHER_BOND_TYPE found no such bond.
_BOND_TYPE_OF_ORDER = {1.0: 0, 2.0: 1, 3.0: 2, 1.5: 3}

# Allowed padded sizes, used for n_node, n_edge and n_graph independently: 16 * 2**k and 24 * 2**k, so
# padding wastes at most half (a third on average) and a stream of batches compiles only a few shapes.
DEFAULT_BUCKETS: tuple[int, ...] = tuple(sorted(b << k for k in range(17) for b in (16, 24)))


def featurize(smiles: str) -> Featurized:
    """One SMILES -> `(atoms [n_atoms, 2], edge_index [2, n_edges], bonds [n_edges, 2])`, int64 numpy.

    Raises `ValueError` naming the SMILES for input the reference featurizer/encoder cannot handle.
    """
    if not isinstance(smiles, str) or not smiles.strip():
        raise ValueError(f"SMILES {smiles!r}: empty or not a string")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"SMILES {smiles!r}: rdkit cannot parse it")
    # rdkit's SMILES parser gives a bond a direction only for a '/' or '\\' bond token or a CXSMILES
    # mark (c:/t:/w:/wU:/wD:, all after a '|'); sanitisation and stereo perception only clear
    # directions. Without these characters every direction is NONE, so they are not read one by one.
    return _featurize(mol, smiles, read_bond_dirs="/" in smiles or "\\" in smiles or "|" in smiles)


def featurize_mol(mol: Chem.Mol, smiles: str = "") -> Featurized:
    """`featurize` for an rdkit molecule (from an SDF, say); `smiles` only names it in errors."""
    return _featurize(mol, smiles, read_bond_dirs=True)


def _featurize(mol: Chem.Mol, smiles: str, read_bond_dirs: bool) -> Featurized:
    """The features of `mol`; `read_bond_dirs=False` only where every bond direction is known NONE.

    Speed: rdkit's Python getters that return an enum (`GetChiralTag`, `GetBondType`, `GetBondDir`)
    cost about 1 us each, as much as making an atom or bond wrapper. So only the atoms that are not
    carbon (about a quarter in drug-like molecules) are read one by one, chiral tags and bond types
    outside the four are found by one C++ pass each (most molecules have neither), bond types are
    then read as floats, and what is read per item goes through `map` over index lookups (not
    `mol.GetAtoms()`/`GetBonds()`, whose sequence wrappers run Python per item). The result and every
    error are those of reading each atom's and bond's features one by one (tests/data/
    test_molecules.py checks it on all NCI and ChEBI-20 test SMILES, mol blocks and hand-made Mols).
    """
    n = mol.GetNumAtoms()
    if n == 0:
        raise ValueError(f"SMILES {smiles!r}: the molecule has no atoms")
    atoms = np.zeros((n, 2), np.int64)                                   # [n_atoms, (element, chirality)]
    atoms[:, 0] = CARBON_ROW
    others = _atoms_matching(mol, _NOT_CARBON)
    if others:
        atoms[others, 0] = [z - 1 if 1 <= z <= 118 else MISC_ATOM
                            for z in map(Chem.Atom.GetAtomicNum, map(mol.GetAtomWithIdx, others))]
    chiral = _atoms_matching(mol, _CHIRAL_TAGGED)
    if chiral:
        _set_chirality(atoms, mol, chiral, smiles)
    n_bonds = mol.GetNumBonds()
    bond_list = list(map(mol.GetBondWithIdx, range(n_bonds)))
    if read_bond_dirs:
        dirs = list(map(_BOND_DIR.get, map(Chem.Bond.GetBondDir, bond_list)))     # None: outside the table
    else:
        dirs = [0] * n_bonds
    if None in dirs or mol.HasSubstructMatch(_OTHER_BOND_TYPE):
        raise _bond_error(bond_list, smiles)
    # only single/double/triple/aromatic are left, whose orders 1, 2, 3, 1.5 tell them apart
    types = list(map(_BOND_TYPE_OF_ORDER.__getitem__, map(Chem.Bond.GetBondTypeAsDouble, bond_list)))
    begin = list(map(Chem.Bond.GetBeginAtomIdx, bond_list))
    end = list(map(Chem.Bond.GetEndAtomIdx, bond_list))
    # edge 2k is (begin_k, end_k), edge 2k + 1 is (end_k, begin_k): built as [row, edge of the bond, k],
    # then put in [row, k, edge of the bond] order
    edge_index = np.array((begin, end, end, begin), np.int64).reshape(2, 2, n_bonds)
    edge_index = edge_index.transpose(0, 2, 1).reshape(2, 2 * n_bonds)
    bonds = np.array((types, dirs, types, dirs), np.int64).T.reshape(2 * n_bonds, 2)
    return atoms, edge_index, bonds


def _atoms_matching(mol: Chem.Mol, one_atom_query: Chem.Mol) -> list[int]:
    """Indices of every atom of `mol` that the one atom of `one_atom_query` matches."""
    return [i for (i,) in mol.GetSubstructMatches(one_atom_query, _EVERY_MATCH)]


def _set_chirality(atoms: np.ndarray, mol: Chem.Mol, chiral: list[int], smiles: str) -> None:
    """Fill `atoms[:, 1]` for the atoms `chiral` (those with a chiral tag); the first (lowest index)
    whose tag is outside the three raises."""
    for k in sorted(chiral):
        atom = mol.GetAtomWithIdx(k)
        tag = atom.GetChiralTag()
        if tag not in _CHIRALITY:
            raise ValueError(f"SMILES {smiles!r}: atom {k} ({atom.GetSymbol()}) has chirality {tag}, "
                             "which the GraphMVP GIN cannot embed")
        atoms[k, 1] = _CHIRALITY[tag]


def _bond_error(bond_list: list[Chem.Bond], smiles: str) -> ValueError:
    """The error for the first bond (in rdkit order) whose type or direction is outside the tables."""
    for k, bond in enumerate(bond_list):
        kind, direction = bond.GetBondType(), bond.GetBondDir()
        if kind not in _BOND_TYPE or direction not in _BOND_DIR:
            bad = kind if kind not in _BOND_TYPE else direction
            return ValueError(f"SMILES {smiles!r}: bond {k} (atoms {bond.GetBeginAtomIdx()}-"
                              f"{bond.GetEndAtomIdx()}) is {bad}, outside the GraphMVP featurization "
                              "(single/double/triple/aromatic, no wedges)")
    raise AssertionError("_bond_error called for a molecule whose bonds are all supported")


def _featurize_or_message(smiles: str) -> Featurized | str:
    try:
        return featurize(smiles)
    except ValueError as e:
        return str(e)


def _map(smiles: Sequence[str], processes: int, chunksize: int) -> list[Featurized | str]:
    if processes <= 1:
        return [_featurize_or_message(s) for s in smiles]
    # spawn, not fork: the parent usually holds a multithreaded JAX runtime.
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        return pool.map(_featurize_or_message, smiles, chunksize=chunksize)


def featurize_many(smiles: Sequence[str], processes: int = 1, chunksize: int = 256) -> list[Featurized]:
    """`featurize` over a list, in order, optionally in `processes` worker processes.

    Raises `ValueError` naming the first bad SMILES and its index in `smiles`.
    """
    out = _map(smiles, processes, chunksize)
    for i, r in enumerate(out):
        if isinstance(r, str):
            raise ValueError(f"molecule {i}: {r}")
    return out


def featurize_valid(smiles: Sequence[str], processes: int = 1,
                    chunksize: int = 256) -> tuple[list[tuple[int, Featurized]], list[tuple[int, str]]]:
    """For dataset loaders: `([(index, features)], [(index, error message)])`; bad records are
    reported and skipped, all others kept."""
    ok, bad = [], []
    for i, r in enumerate(_map(smiles, processes, chunksize)):
        (bad if isinstance(r, str) else ok).append((i, r))
    return ok, bad


def kept_atoms(n_atoms: int, max_atoms: int | None, over_cap: Literal["error", "subsample"],
               smiles: str = "") -> np.ndarray:
    """Indices of the atoms whose features become tokens, sorted, at most `max_atoms` of them.

    `max_atoms=None`: every atom, as the reference gives the LLM (its `convert_pyg_batch(max_n_nodes=256)`
    call is commented out). With a cap, a larger molecule is either an error (`ValueError` naming the
    SMILES) or deterministically subsampled to `max_atoms` atoms evenly spaced over the whole molecule.
    The GIN still encodes the full graph, so each kept atom's features are those the reference computes.
    """
    if max_atoms is None or n_atoms <= max_atoms:
        return np.arange(n_atoms)
    if over_cap == "error":
        raise ValueError(f"SMILES {smiles!r}: {n_atoms} atoms exceed the cap of {max_atoms} "
                         "(set over_cap: subsample to keep an evenly spaced subset)")
    if over_cap != "subsample":
        raise ValueError(f"over_cap must be 'error' or 'subsample', got {over_cap!r}")
    return np.unique(np.linspace(0, n_atoms - 1, max_atoms).round().astype(np.int64))


def choose_bucket(n_node: int, n_edge: int, n_graph: int,
                  buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, int, int]:
    """Padded `(n_node, n_edge, n_graph)` for a batch of `n_node` atoms, `n_edge` edges, `n_graph`
    molecules: for each, the smallest size in `buckets` holding it, with one extra node and graph for
    the padding graph. Beyond the largest bucket a size doubles until it fits, so shapes stay few."""
    ladder = sorted(buckets)

    def fit(want: int) -> int:
        size = next((b for b in ladder if b >= want), ladder[-1])
        while size < want:
            size *= 2
        return size

    return fit(n_node + 1), fit(n_edge), fit(n_graph + 1)


def batch_graphs(featurized: Sequence[Featurized], n_node: int | None = None, n_edge: int | None = None,
                 n_graph: int | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS) -> jraph.GraphsTuple:
    """Molecules (from `featurize`) -> one `GraphsTuple` padded with `jraph.pad_with_graphs`.

    nodes `[N, 2]`, edges `[E, 2]`, senders/receivers `[E]` (global node indices, sender = edge_index[0]),
    n_node/n_edge `[G]`, all int32; real molecules first in list order, then the padding graph, then
    empty graphs. Sizes come from `choose_bucket`; an explicit size overrides its part.
    """
    import jraph
    if featurized:
        atoms = np.concatenate([f[0] for f in featurized]).astype(np.int32)
        bonds = np.concatenate([f[2] for f in featurized]).astype(np.int32).reshape(-1, 2)
        sizes = np.array([len(f[0]) for f in featurized], np.int32)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        edge_index = np.concatenate([f[1] + o for f, o in zip(featurized, offsets)], axis=1)
        edge_index = edge_index.astype(np.int32).reshape(2, -1)
        n_edges = np.array([f[1].shape[1] for f in featurized], np.int32)
    else:
        atoms, bonds = np.zeros((0, 2), np.int32), np.zeros((0, 2), np.int32)
        edge_index, sizes, n_edges = np.zeros((2, 0), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32)
    graph = jraph.GraphsTuple(nodes=atoms, edges=bonds, senders=edge_index[0], receivers=edge_index[1],
                              n_node=sizes, n_edge=n_edges, globals=None)
    auto = choose_bucket(len(atoms), len(bonds), len(sizes), buckets)
    budget = [auto[k] if v is None else v for k, v in enumerate((n_node, n_edge, n_graph))]
    if budget[0] <= len(atoms) or budget[1] < len(bonds) or budget[2] <= len(sizes):
        raise ValueError(f"padding budget n_node={budget[0]}, n_edge={budget[1]}, n_graph={budget[2]} is "
                         f"too small for {len(atoms)} nodes, {len(bonds)} edges, {len(sizes)} graphs "
                         "(needs one more node and one more graph for padding)")
    padded = jraph.pad_with_graphs(graph, *budget)
    # jraph adds int64 offsets to senders/receivers; keep every index array int32 (the batch format).
    return padded._replace(**{k: getattr(padded, k).astype(np.int32)
                              for k in ("nodes", "edges", "senders", "receivers", "n_node", "n_edge")})


def unpad_nodes(node_features: np.ndarray, graph: jraph.GraphsTuple) -> list[np.ndarray]:
    """Per-node outputs `[N, ...]` of a padded batch -> one `[n_atoms, ...]` array per real molecule
    (on the host: the real molecules are those before the padding graph and the empty graphs after it)."""
    n_node = np.asarray(graph.n_node)
    n_real = len(n_node) - 1 - int(np.argmin(n_node[::-1] == 0))
    if n_real == 0:
        return []
    sizes = n_node[:n_real]
    return np.split(np.asarray(node_features)[: sizes.sum()], np.cumsum(sizes)[:-1])
