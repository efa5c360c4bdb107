"""Plain-PyTorch GraphMVP GIN (OpenBioMed `GNNGraphMVP`, gnn_type "gin", JK "last"), no torch_geometric.

Same state-dict layout as the reference checkpoints: `x_embedding1.weight`, `x_embedding2.weight`,
`gnns.{i}.mlp.{0,2}.{weight,bias}`, `gnns.{i}.edge_embedding{1,2}.weight`,
`batch_norms.{i}.{weight,bias,running_mean,running_var,num_batches_tracked}`; same initialisation
(xavier-uniform embeddings, torch defaults elsewhere). Message passing is torch_geometric's
`propagate` with flow source -> target written out: self-loops `[4, 0]` appended after the real edges,
messages `x[edge_index[0]] + edge_emb` summed into `edge_index[1]` with `index_add_`.

API: `TorchGIN(num_layer, emb_dim, drop_ratio).forward(x [N,2], edge_index [2,E], edge_attr [E,2])
-> [N, emb_dim]` node features; `mean_pool(h, batch)` for graph vectors; `graph_batch(featurized)`
concatenates `bmgpt_jax.data.molecules.featurize` outputs the way torch_geometric's Batch does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_ATOM_TYPE, NUM_CHIRALITY_TAG, NUM_BOND_TYPE, NUM_BOND_DIRECTION = 120, 3, 6, 3


class GINConv(nn.Module):
    """pretrain-gnns GINConv: aggr "add", message x_j + edge embedding, update mlp."""

    def __init__(self, emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(emb_dim, 2 * emb_dim), nn.ReLU(), nn.Linear(2 * emb_dim, emb_dim))
        self.edge_embedding1 = nn.Embedding(NUM_BOND_TYPE, emb_dim)
        self.edge_embedding2 = nn.Embedding(NUM_BOND_DIRECTION, emb_dim)
        nn.init.xavier_uniform_(self.edge_embedding1.weight.data)
        nn.init.xavier_uniform_(self.edge_embedding2.weight.data)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        loops = torch.arange(n, device=x.device)
        edge_index = torch.cat([edge_index, torch.stack([loops, loops])], dim=1)
        self_loop_attr = torch.zeros(n, 2, dtype=edge_attr.dtype, device=x.device)
        self_loop_attr[:, 0] = 4
        edge_attr = torch.cat([edge_attr, self_loop_attr], dim=0)
        edge_emb = self.edge_embedding1(edge_attr[:, 0]) + self.edge_embedding2(edge_attr[:, 1])
        messages = x[edge_index[0]] + edge_emb
        aggr = torch.zeros_like(x).index_add_(0, edge_index[1], messages)
        return self.mlp(aggr)


class TorchGIN(nn.Module):
    """GNNGraphMVP(num_layer, emb_dim, JK="last", drop_ratio, gnn_type="gin")."""

    def __init__(self, num_layer: int = 5, emb_dim: int = 300, drop_ratio: float = 0.0):
        super().__init__()
        self.num_layer, self.drop_ratio = num_layer, drop_ratio
        self.x_embedding1 = nn.Embedding(NUM_ATOM_TYPE, emb_dim)
        self.x_embedding2 = nn.Embedding(NUM_CHIRALITY_TAG, emb_dim)
        nn.init.xavier_uniform_(self.x_embedding1.weight.data)
        nn.init.xavier_uniform_(self.x_embedding2.weight.data)
        self.gnns = nn.ModuleList([GINConv(emb_dim) for _ in range(num_layer)])
        self.batch_norms = nn.ModuleList([nn.BatchNorm1d(emb_dim) for _ in range(num_layer)])

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        h = self.x_embedding1(x[:, 0]) + self.x_embedding2(x[:, 1])
        for layer in range(self.num_layer):
            h = self.batch_norms[layer](self.gnns[layer](h, edge_index, edge_attr))
            if layer < self.num_layer - 1:
                h = F.relu(h)
            h = F.dropout(h, self.drop_ratio, training=self.training)
        return h


def mean_pool(h: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """torch_geometric global_mean_pool: `[N, d]`, graph index per node `[N]` -> `[G, d]`."""
    n_graph = int(batch.max()) + 1
    sums = torch.zeros(n_graph, h.size(1), dtype=h.dtype).index_add_(0, batch, h)
    counts = torch.bincount(batch, minlength=n_graph).clamp(min=1).to(h.dtype)
    return sums / counts[:, None]


def graph_batch(featurized) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Featurized molecules -> `(x, edge_index, edge_attr, batch)` as one disjoint graph (PyG Batch)."""
    sizes = [len(f[0]) for f in featurized]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    x = torch.from_numpy(np.concatenate([f[0] for f in featurized]))
    edge_index = torch.from_numpy(np.concatenate([f[1] + o for f, o in zip(featurized, offsets)], axis=1))
    edge_attr = torch.from_numpy(np.concatenate([f[2] for f in featurized]).reshape(-1, 2))
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return x, edge_index, edge_attr, batch
