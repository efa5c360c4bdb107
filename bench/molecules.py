"""Molecule path throughput: featurization (1 and N processes) and the GIN encoder, ours vs the
plain-torch reference, measured in one run on the same machine.

    python bench/molecules.py [--processes 2] [--encode 1024] [--batch 64] [--repeat 1] [--trials 5]

Featurization runs over drug-like SMILES: the NCI set shipped with rdkit plus the ChEMBL drugs in
../shared/data (when present), repeated `--repeat` times; the multi-process figure includes starting
the (spawn) workers. The encoder rows use the full GraphMVP size (5 x 300) in eval mode on ChEBI-20
molecules (or the NCI set), `--batch` molecules per padded batch; ours is jitted (compile time
reported separately, once per bucket), torch runs with as many threads as the machine has cores; before
timing, our node embeddings must equal the torch reference's within 1e-4 (the difference is printed).
The protocol of bench/protocol.py: machine header, one warm-up call per row, --trials timed calls with
ours and torch interleaved call by call, median and min-max, ratio of medians, load before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
from pathlib import Path

import jax
import numpy as np
from rdkit import Chem, RDConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import protocol as P  # noqa: E402  (bench/protocol.py; scripts run as python bench/x.py)

from bmgpt_jax.config import load  # noqa: E402
from bmgpt_jax.convert import graphmvp_gin  # noqa: E402
from bmgpt_jax.data import molecules as M  # noqa: E402
from bmgpt_jax.data.builders import shared_data_dir  # noqa: E402
from bmgpt_jax import encode as E  # noqa: E402
from bmgpt_jax.models import gin as G  # noqa: E402


def drug_like_smiles(shared: Path) -> list[str]:
    nci = [line.split()[0] for line in open(os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi"))]
    drugs = json.loads((shared / "molecules" / "chembl_drug_qa.json").read_text()) if shared.is_dir() else {}
    return [s for s in nci + list(drugs) if Chem.MolFromSmiles(s) is not None]  # 1 dative bond: skipped


def chebi_smiles(shared: Path) -> list[str]:
    out = []
    for name in ("chebi20_test.txt", "chebi20_validation.txt"):
        path = shared / "molecules" / name
        if path.exists():
            out += [line.split("\t")[1] for line in path.read_text().splitlines()[1:]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--encode", type=int, default=1024, help="molecules through the encoder")
    ap.add_argument("--batch", type=int, default=64, help="molecules per padded batch")
    ap.add_argument("--repeat", type=int, default=1, help="passes over the featurization set")
    ap.add_argument("--shared", type=Path, default=shared_data_dir() or REPO.parent / "shared" / "data")
    P.add_trials_arg(ap)
    args = ap.parse_args()
    load_before = P.header("bench/molecules.py: featurisation, and the GIN 5x300 encoder ours vs the torch reference")

    rows = []
    smiles = drug_like_smiles(args.shared) * args.repeat
    atoms = np.mean([Chem.MolFromSmiles(s).GetNumAtoms() for s in smiles[: len(smiles) // args.repeat]])
    n_feat = len(smiles)
    feat = P.interleave({"serial": lambda: M.featurize_valid(smiles),
                         "parallel": lambda: M.featurize_valid(smiles, processes=args.processes)}, args.trials)
    rows.append([f"featurize, 1 process ({n_feat} mols, {atoms:.1f} atoms avg)", P.rate(feat["serial"], n_feat), ""])
    rows.append([f"featurize, {args.processes} processes (incl. worker start)", P.rate(feat["parallel"], n_feat), ""])

    import torch
    from tests.torch_refs.gin import TorchGIN, graph_batch
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    ref = TorchGIN(5, 300).eval()
    model = graphmvp_gin.load(ref.state_dict(), config=load(G.GinConfig, "gin_graphmvp"))
    mols = [s for s in (chebi_smiles(args.shared) or smiles) if Chem.MolFromSmiles(s)][: args.encode]
    ok, _ = M.featurize_valid(mols)
    ok = [(i, f) for i, f in ok if len(f[0]) <= 256]   # the set the figures used (once the default atom cap)
    mols, feats = [mols[i] for i, _ in ok], [f for _, f in ok]
    chunks = [feats[i:i + args.batch] for i in range(0, len(feats), args.batch)]
    graphs = [M.batch_graphs(c) for c in chunks]
    torch_inputs = [graph_batch(c)[:3] for c in chunks]

    from flax import nnx
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    for g in {g.nodes.shape + g.edges.shape + g.n_node.shape: g for g in graphs}.values():
        E._forward(state, graphdef, g).block_until_ready()
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        diff = 0.0
        for g, t in zip(graphs, torch_inputs):
            theirs = ref(*t).numpy()
            diff = max(diff, float(np.abs(np.asarray(E._forward(state, graphdef, g))[:len(theirs)] - theirs).max()))
    assert diff < 1e-4, f"GIN node embeddings: max |ours - torch| {diff:.2e} >= 1e-4"

    def torch_pass():
        with torch.no_grad():
            return [ref(*t) for t in torch_inputs]
    n = len(feats)
    gin = P.interleave({"ours": lambda: [E._forward(state, graphdef, g).block_until_ready() for g in graphs],
                        "torch": torch_pass}, args.trials)
    rows.append([f"GIN 5x300 eval, ours (jax {jax.default_backend()}, {n} mols, batches of {args.batch}; compile "
                 f"{compile_s:.1f}s for {len({g.nodes.shape for g in graphs})} buckets)", P.rate(gin["ours"], n),
                 P.ratio(gin["ours"], gin["torch"])])
    rows.append([f"GIN 5x300 eval, torch reference ({torch.get_num_threads()} threads)", P.rate(gin["torch"], n),
                 "1.00x"])
    e2e = P.interleave({"e2e": lambda: E.encode_smiles(model, mols)}, args.trials)  # warm-up compiles its buckets
    rows.append(["encode_smiles end to end (featurize + batch + encode + unpad)", P.rate(e2e["e2e"], len(mols)), ""])
    print(f"\nGIN node embeddings, max |ours - torch| {diff:.1e}; {args.trials} trials, median (min-max)")
    P.table(["what", "molecules/s", "ours / torch"], rows)
    P.footer(load_before)


if __name__ == "__main__":
    main()
