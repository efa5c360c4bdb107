"""Encoders applied to raw inputs on the host: SMILES -> per-atom GIN features, bucketed and jitted.

Inference helpers for users of the molecule encoder alone (retrieval, probing); training and chat embed
molecules inside their own jitted steps.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jraph
import numpy as np
from flax import nnx

from bmgpt_jax.data import molecules
from bmgpt_jax.models.gin import GIN


@functools.partial(jax.jit, static_argnums=1)
def _forward(state: nnx.State, graphdef: nnx.GraphDef, graph: jraph.GraphsTuple) -> jax.Array:
    return nnx.merge(graphdef, state)(graph)


def encode_smiles(model: GIN, smiles: Sequence[str], max_nodes_per_batch: int = 4096) -> list[np.ndarray]:
    """SMILES -> one `[n_kept, emb_dim]` float array per molecule (eval mode, jitted once per bucket).

    `n_kept` is the atom count (`max_atoms` None, the default), or with a cap `model.config.max_atoms` for
    a larger molecule when `over_cap` is "subsample" (`molecules.kept_atoms`); a bad SMILES or an over-cap
    molecule with "error" raises
    `ValueError` naming it and its index. Molecules are batched in order up to `max_nodes_per_batch`.
    """
    feats = molecules.featurize_many(smiles)
    cfg = model.config
    keep = []
    for i, (s, f) in enumerate(zip(smiles, feats)):
        try:
            keep.append(molecules.kept_atoms(len(f[0]), cfg.max_atoms, cfg.over_cap, s))
        except ValueError as e:
            raise ValueError(f"molecule {i}: {e}") from None
    graphdef, state = nnx.split(nnx.view(model, use_running_average=True, deterministic=True))
    out: list[np.ndarray] = []
    start = 0
    while start < len(feats):
        stop, nodes = start, 0
        while stop < len(feats) and (stop == start or nodes + len(feats[stop][0]) <= max_nodes_per_batch):
            nodes += len(feats[stop][0])
            stop += 1
        graph = molecules.batch_graphs(feats[start:stop])
        h = np.asarray(_forward(state, graphdef, graph))
        out.extend(x[k] for x, k in zip(molecules.unpad_nodes(h, graph), keep[start:stop]))
        start = stop
    return out
