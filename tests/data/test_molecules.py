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
                                           ("N->[Cu]", "DATIVE"), ("F[Pt@SP1](Cl)(Br)I", "CHI_SQUAREPLANAR")])
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
