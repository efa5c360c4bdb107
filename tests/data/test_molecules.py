"""Featurizer (against an independent transcription of OpenBioMed's MolGraphFeaturizer on real SMILES),
padded batching to buckets, masks, the atom cap and bad input."""
import os

import jraph
import numpy as np
import pytest
from rdkit import Chem, RDConfig

from bmgpt_jax.data import molecules as M


def read_chebi(shared_data) -> list[str]:
    smiles = []
    for name in ("chebi20_test.txt", "chebi20_validation.txt"):
        lines = (shared_data / "molecules" / name).read_text().splitlines()[1:]
        smiles += [line.split("\t")[1] for line in lines]
    return smiles


@pytest.fixture(scope="module")
def chebi(shared_data):
    return read_chebi(shared_data)


@pytest.fixture(scope="module")
def nci():
    path = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")
    return [line.split()[0] for line in open(path) if line.strip()]


# OpenBioMed open_biomed/feature/mol_featurizer.py, MolGraphFeaturizer with name "BaseGNN", transcribed.
ATOMIC_NUMS = list(range(1, 119)) + ["misc"]
CHIRALITY = [Chem.ChiralType.CHI_UNSPECIFIED, Chem.ChiralType.CHI_TETRAHEDRAL_CW,
             Chem.ChiralType.CHI_TETRAHEDRAL_CCW, Chem.ChiralType.CHI_OTHER]
BOND_TYPES = [Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC, "misc"]
BOND_DIRS = [Chem.BondDir.NONE, Chem.BondDir.ENDUPRIGHT, Chem.BondDir.ENDDOWNRIGHT]


def safe_index(seq, e):
    return seq.index(e) if e in seq else len(seq) - 1


def reference(smiles):
    """OpenBioMed's output, or None where it raises (list.index) or where the GIN's 3-row
    chirality table cannot embed it (CHI_OTHER -> 3)."""
    mol = Chem.MolFromSmiles(smiles)
    try:
        x = [[safe_index(ATOMIC_NUMS, a.GetAtomicNum()), CHIRALITY.index(a.GetChiralTag())] for a in mol.GetAtoms()]
        edges, attrs = [], []
        for b in mol.GetBonds():
            i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
            f = [BOND_TYPES.index(b.GetBondType()), BOND_DIRS.index(b.GetBondDir())]
            edges += [(i, j), (j, i)]
            attrs += [f, f]
    except ValueError:
        return None
    if any(chi >= 3 for _, chi in x):
        return None
    return np.array(x), np.array(edges).reshape(-1, 2).T, np.array(attrs).reshape(-1, 2)


def check_against_reference(smiles_list):
    n_ok = 0
    for s in smiles_list:
        ref = reference(s)
        if ref is None:
            with pytest.raises(ValueError, match="SMILES"):
                M.featurize(s)
            continue
        got = M.featurize(s)
        for g, r in zip(got, ref):
            assert g.dtype == np.int64 and g.shape == r.shape and np.array_equal(g, r), s
        n_ok += 1
    return n_ok


def test_known_molecule():
    atoms, edge_index, bonds = M.featurize("C/C=C/[C@H](N)*")
    assert atoms.tolist() == [[5, 0], [5, 0], [5, 0], [5, 2], [6, 0], [118, 0]]  # @ is CCW
    assert edge_index[:, :4].tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]
    assert bonds.tolist()[:6] == [[0, 1], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1]]
    assert edge_index.shape == (2, 10) and bonds.shape == (10, 2)
    atoms, edge_index, bonds = M.featurize("[Na+].[Cl-]")
    assert atoms.tolist() == [[10, 0], [16, 0]] and edge_index.shape == (2, 0) and bonds.shape == (0, 2)


def test_all_chebi20_match_reference(chebi):
    assert len(chebi) == 6601
    assert check_against_reference(chebi) == 6601


def test_nci_first_5k(nci):
    assert len(nci) == 4999
    parsable = [s for s in nci if Chem.MolFromSmiles(s) is not None]
    assert check_against_reference(parsable) == len(parsable) - 1   # one dative bond
    ok, bad = M.featurize_valid(nci)
    assert len(ok) + len(bad) == 4999 and len(bad) == 9
    assert [i for i, _ in ok] == sorted(set(range(4999)) - {i for i, _ in bad})
    assert all(nci[i] in msg for i, msg in bad)
    assert sum("DATIVE" in msg for _, msg in bad) == 1


@pytest.mark.parametrize("smiles,reason", [("", "empty"), ("  ", "empty"), ("C1CC", "cannot parse"),
                                           ("N->[Cu]", "DATIVE"), ("F[Pt@SP1](Cl)(Br)I", "CHI_SQUAREPLANAR"),
                                           ("C[C@H](F)Cl |wU:1.0|", "BEGINWEDGE"),
                                           ("CC=CC |w:1.0|", "UNKNOWN")])
def test_bad_input_names_smiles(smiles, reason):
    with pytest.raises(ValueError, match=reason) as e:
        M.featurize(smiles)
    assert repr(smiles) in str(e.value)


def test_chi_other_and_zero_atoms_rejected():
    mol = Chem.RWMol(Chem.MolFromSmiles("CC(N)O"))
    mol.GetAtomWithIdx(1).SetChiralTag(Chem.ChiralType.CHI_OTHER)
    with pytest.raises(ValueError, match="CHI_OTHER"):
        M.featurize_mol(mol, "CC(N)O")
    with pytest.raises(ValueError, match="no atoms"):
        M.featurize_mol(Chem.Mol(), "x")


# The featurizer as it read molecules before its bulk checks, transcribed: one rdkit getter per atom
# and per bond, every chiral tag, bond type and bond direction read. `featurize` / `featurize_mol`
# must give the same arrays (values, int64, shapes, C order, edge order) and the same error messages.
CHI_ROW = {Chem.ChiralType.CHI_UNSPECIFIED: 0, Chem.ChiralType.CHI_TETRAHEDRAL_CW: 1,
           Chem.ChiralType.CHI_TETRAHEDRAL_CCW: 2}
TYPE_ROW = {Chem.BondType.SINGLE: 0, Chem.BondType.DOUBLE: 1, Chem.BondType.TRIPLE: 2,
            Chem.BondType.AROMATIC: 3}
DIR_ROW = {Chem.BondDir.NONE: 0, Chem.BondDir.ENDUPRIGHT: 1, Chem.BondDir.ENDDOWNRIGHT: 2}


def per_item(mol, smiles):
    """`(atoms, edge_index, bonds)`, or the ValueError message, reading every atom and bond."""
    if mol.GetNumAtoms() == 0:
        return f"SMILES {smiles!r}: the molecule has no atoms"
    atoms, edges, feats = [], [], []
    for k in range(mol.GetNumAtoms()):
        atom = mol.GetAtomWithIdx(k)
        z, tag = atom.GetAtomicNum(), atom.GetChiralTag()
        if tag not in CHI_ROW:
            return (f"SMILES {smiles!r}: atom {k} ({atom.GetSymbol()}) has chirality {tag}, which the "
                    "GraphMVP GIN cannot embed")
        atoms.append([z - 1 if 1 <= z <= 118 else 118, CHI_ROW[tag]])
    for k in range(mol.GetNumBonds()):
        bond = mol.GetBondWithIdx(k)
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        kind, direction = bond.GetBondType(), bond.GetBondDir()
        if kind not in TYPE_ROW or direction not in DIR_ROW:
            bad = kind if kind not in TYPE_ROW else direction
            return (f"SMILES {smiles!r}: bond {k} (atoms {i}-{j}) is {bad}, outside the GraphMVP "
                    "featurization (single/double/triple/aromatic, no wedges)")
        edges += [[i, j], [j, i]]
        feats += [[TYPE_ROW[kind], DIR_ROW[direction]]] * 2
    return (np.array(atoms, np.int64), np.array(edges, np.int64).reshape(-1, 2).T.copy(),
            np.array(feats, np.int64).reshape(-1, 2))


def outcome(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        return str(e)


def assert_same(got, want, name):
    if isinstance(want, str) or isinstance(got, str):
        assert got == want, name
        return
    assert len(got) == len(want) == 3, name
    assert all(g.dtype == np.int64 and g.flags.c_contiguous and np.array_equal(g, w) and g.shape == w.shape
               for g, w in zip(got, want)), name


def test_fast_path_equals_per_item_reading(nci, shared_data):
    """All NCI and ChEBI-20 test SMILES, through `featurize` (which skips reading bond directions for
    SMILES that cannot set any) and `featurize_mol`; every 10th also as an unsanitised Mol."""
    lines = (shared_data / "molecules" / "chebi20_test.txt").read_text().splitlines()[1:]
    smiles = nci + [line.split("\t")[1] for line in lines]
    n_chiral = n_directed = n_bad = 0
    for k, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            continue
        want = per_item(mol, s)
        assert_same(outcome(M.featurize, s), want, s)
        assert_same(outcome(M.featurize_mol, mol, s), want, s)
        if k % 10 == 0:
            raw = Chem.MolFromSmiles(s, sanitize=False)     # unkekulised, no stereo perception
            assert_same(outcome(M.featurize_mol, raw, s), per_item(raw, s), s)
        if isinstance(want, str):
            n_bad += 1
        else:
            n_chiral += bool(want[0][:, 1].any())
            n_directed += bool(want[2][:, 1].any())
    assert n_bad == 1 and n_chiral > 500 and n_directed > 50      # every branch of the fast path ran


def test_mol_block_molecules_and_wedges(chebi):
    """Mols from mol blocks (stereo from 2D coordinates and wedges); with the wedges put back as bond
    directions (BEGINWEDGE/BEGINDASH) the GIN cannot embed them, and the error is the same."""
    stereo = [s for s in chebi if "@" in s or "/" in s][:40]
    n_wedged = 0
    for s in stereo:
        block = Chem.MolToMolBlock(Chem.MolFromSmiles(s))
        mol = Chem.MolFromMolBlock(block)
        assert_same(outcome(M.featurize_mol, mol, s), per_item(mol, s), s)
        Chem.ReapplyMolBlockWedging(mol)
        want = per_item(mol, s)
        n_wedged += isinstance(want, str) and "BEGIN" in want
        assert_same(outcome(M.featurize_mol, mol, s), want, s)
    assert n_wedged > 20


def edited(smiles, edit):
    mol = Chem.RWMol(Chem.MolFromSmiles(smiles))
    edit(mol)
    return mol


B, D, CT = Chem.BondType, Chem.BondDir, Chem.ChiralType
HAND_MADE = [Chem.MolFromSmiles(s) for s in (
    "C[C@H](N)O", "C[C@@H](N)O", "N[C@@H](C)C(=O)O", "F/C=C/F", "F/C=C\\F", "C/C=C/[C@H](N)*", "*",
    "c1ccccc1O", "C#N", "CC#CC=O", "[Na+].[Cl-]", "O", "N->[Cu]", "[Cu]<-N", "F[Pt@SP1](Cl)(Br)I",
    "C[Fe@TB1](F)(Cl)(Br)I", "CC=CC |c:1|", "CC=CC |t:1|", "CC=CC |w:1.0|", "C[C@H](F)Cl |wU:1.0|",
    "CCO ethanol/x", "O" * 1200, "F[C@H](Cl)[C@@H](Br)[C@H](I)F")] + [             # > 1000 non-carbons
    edited("CC(N)O", lambda m: m.GetAtomWithIdx(1).SetChiralTag(CT.CHI_OTHER)),
    edited("CC(N)C(F)O", lambda m: (m.GetAtomWithIdx(4).SetChiralTag(CT.CHI_OTHER),
                                    m.GetAtomWithIdx(1).SetChiralTag(CT.CHI_SQUAREPLANAR))),
    edited("CC(N)C(F)O", lambda m: (m.GetAtomWithIdx(1).SetChiralTag(CT.CHI_TETRAHEDRAL_CW),
                                    m.GetAtomWithIdx(3).SetChiralTag(CT.CHI_TETRAHEDRAL_CCW))),
    edited("CCO", lambda m: m.GetAtomWithIdx(2).SetAtomicNum(120)),                # misc row, like 0
    edited("CC=CC", lambda m: m.GetBondWithIdx(1).SetBondDir(D.ENDUPRIGHT)),       # a direction on =
    edited("CC=CC", lambda m: (m.GetBondWithIdx(2).SetBondType(B.DATIVE),          # first bad bond:
                               m.GetBondWithIdx(1).SetBondDir(D.BEGINDASH))),      # bond 1, its dir
    edited("CC=CC", lambda m: (m.GetBondWithIdx(1).SetBondType(B.ZERO),            # type named before
                               m.GetBondWithIdx(1).SetBondDir(D.BEGINWEDGE))),     # the direction
    edited("c1ccccc1", lambda m: Chem.Kekulize(m, clearAromaticFlags=False)),     # aromatic flags, = types
    Chem.Mol()] + [
    edited("CCC", lambda m, t=t: m.GetBondWithIdx(1).SetBondType(t)) for t in B.values.values()] + [
    edited("CCC", lambda m, d=d: m.GetBondWithIdx(1).SetBondDir(d)) for d in D.values.values()]


@pytest.mark.parametrize("index", range(len(HAND_MADE)))
def test_hand_made_molecules_equal_per_item_reading(index):
    mol, name = HAND_MADE[index], f"hand-made {index}"
    assert_same(outcome(M.featurize_mol, mol, name), per_item(mol, name), name)


@pytest.mark.parametrize("smiles,bond_dirs", [
    ("F/C=C/F", [1, 0, 1]), ("F/C=C\\F", [1, 0, 2]), ("CC=CC |c:1|", [1, 0, 2]), ("CC=CC |t:1|", [1, 0, 1]),
    ("CCO ethanol/x", [0, 0]), ("C[C@H](N)O", [0, 0, 0])])
def test_featurize_reads_bond_directions_where_the_smiles_can_set_them(smiles, bond_dirs):
    """`featurize` skips reading directions unless the SMILES has '/', '\\' or a CXSMILES part ('|')."""
    want = per_item(Chem.MolFromSmiles(smiles), smiles)
    assert_same(M.featurize(smiles), want, smiles)
    assert want[2][::2, 1].tolist() == bond_dirs


def test_featurize_many_names_index_and_processes(chebi):
    with pytest.raises(ValueError, match=r"molecule 2: SMILES 'C1CC'"):
        M.featurize_many(["CCO", "c1ccccc1", "C1CC"])
    subset = chebi[:300]
    serial, parallel = M.featurize_many(subset), M.featurize_many(subset, processes=2, chunksize=32)
    assert all(all(np.array_equal(a, b) for a, b in zip(s, p)) for s, p in zip(serial, parallel))


def test_batch_graphs_order_offsets_and_bucket():
    feats = M.featurize_many(["CCO", "c1ccccc1", "[Na+]"])
    g = M.batch_graphs(feats)
    assert (g.nodes.shape[0], g.edges.shape[0], g.n_node.shape[0]) == M.choose_bucket(10, 16, 3) == (16, 16, 16)
    assert g.n_node.tolist()[:3] == [3, 6, 1] and g.n_edge.tolist()[:3] == [4, 12, 0]
    assert np.array_equal(g.nodes[:10], np.concatenate([f[0] for f in feats]))
    assert np.array_equal(g.senders[4:16], feats[1][1][0] + 3) and np.array_equal(g.receivers[4:16], feats[1][1][1] + 3)
    assert all(a.dtype == np.int32 for a in (g.nodes, g.edges, g.senders, g.receivers, g.n_node, g.n_edge))
    node_mask, graph_mask = np.asarray(jraph.get_node_padding_mask(g)), np.asarray(jraph.get_graph_padding_mask(g))
    assert node_mask.sum() == 10 and node_mask[:10].all() and graph_mask.tolist() == [True] * 3 + [False] * 13
    assert (g.senders[16:] >= 10).all() and (g.receivers[16:] >= 10).all()   # padding edges stay in padding
    parts = M.unpad_nodes(np.arange(16), g)
    assert [p.tolist() for p in parts] == [[0, 1, 2], list(range(3, 9)), [9]]


def test_batch_graphs_explicit_sizes_and_errors():
    feats = M.featurize_many(["CCO"] * 5)
    g = M.batch_graphs(feats, n_node=40, n_graph=9)
    assert (g.nodes.shape[0], g.edges.shape[0], g.n_node.shape[0]) == (40, 24, 9)   # edges from the ladder: 20 -> 24
    with pytest.raises(ValueError, match="too small"):
        M.batch_graphs(feats, n_node=15)     # 15 atoms leave no padding node
    empty = M.batch_graphs([])
    assert empty.n_node.shape[0] == 16 and not np.asarray(jraph.get_node_padding_mask(empty)).any()
    assert M.unpad_nodes(np.zeros(empty.nodes.shape[0]), empty) == []


def test_bucket_growth_beyond_largest():
    assert M.choose_bucket(40000, 0, 3) == (49152, 16, 16)
    assert M.choose_bucket(10, 10, 5000, buckets=[64]) == (64, 64, 8192)
    assert M.choose_bucket(2_000_000, 10, 3)[0] == 3 << 20


def test_atom_cap(chebi):
    big = next(s for s in chebi if Chem.MolFromSmiles(s).GetNumAtoms() > 256)
    n = len(M.featurize(big)[0])
    with pytest.raises(ValueError, match=f"{n} atoms exceed the cap of 256") as e:
        M.kept_atoms(n, 256, "error", big)
    assert big in str(e.value)
    kept = M.kept_atoms(n, 256, "subsample", big)
    assert len(kept) == 256 and kept[0] == 0 and kept[-1] == n - 1 and (np.diff(kept) > 0).all()
    assert np.array_equal(M.kept_atoms(30, 256, "error"), np.arange(30))
