"""The GraphMVP GIN molecule encoder (pretrain-gnns / OpenBioMed `GNNGraphMVP`, gnn_type "gin") on jraph.

Per layer: messages `h[sender] + edge_embedding1(type) + edge_embedding2(direction)` summed at the
receiver, plus a self-loop message (bond type 4, direction 0) for every node; then MLP
`d -> 2d -> ReLU -> d`, BatchNorm, ReLU (not after the last layer) and dropout. JK "last": the output is
the last layer's node features, one `[emb_dim]` vector per atom, which BioMedGPT turns into tokens.

Padding from `jraph.pad_with_graphs` never changes real outputs: padding edges join padding nodes only,
and BatchNorm's training statistics are taken over real nodes only. Which nodes are real comes from an
explicit node mask when the caller has one (the batch's `mol_node_mask`: several processes' padded graphs
concatenated hold several padding graphs, which `jraph.get_node_padding_mask`, reading only the last
graph, cannot see), else from jraph. Parameter names follow PyTorch
(`gnns[i].mlp_0` is `gnns.{i}.mlp.0`), so `bmgpt_jax.convert.graphmvp_gin` is a key table.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

from bmgpt_jax import config as config_lib
from bmgpt_jax.data import molecules
from bmgpt_jax.models.layers import Embedding, Linear, dtype_of, param


@dataclasses.dataclass(frozen=True)
class GinConfig:
    """GIN hyper-parameters (GraphMVP / BioMedGPT: 5 layers, 300 wide, JK last, no dropout) and the
    atom cap, the one setting training, evaluation and chat all follow. `max_atoms=None` (default): every
    atom is a token, as in the reference; an int caps the atom tokens per molecule (to bound memory): a
    molecule over it is evenly subsampled to `max_atoms` atom tokens ("subsample"), or refused ("error":
    chat and evaluation report it, training drops and counts the example), see `molecules.kept_atoms`."""
    num_layers: int = 5
    emb_dim: int = 300
    jk: Literal["last"] = "last"
    drop_ratio: float = 0.0
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1          # PyTorch convention: running = (1 - m) * running + m * batch
    max_atoms: int | None = None      # None: every atom a token (the reference); an int: a cap
    over_cap: Literal["subsample", "error"] = "subsample"
    dtype: str = "float32"            # compute dtype; BatchNorm statistics are always float32
    param_dtype: str = "float32"

    def __post_init__(self):
        config_lib.check_fields(self)   # e.g. {"num_layers": "x"} in a gin_config.json: ConfigError naming the key
        if self.num_layers < 2:
            raise config_lib.ConfigError(f"num_layers: a GIN needs at least 2 layers, got {self.num_layers}")
        if self.emb_dim < 1:
            raise config_lib.ConfigError(f"emb_dim: must be >= 1, got {self.emb_dim}")
        if self.max_atoms is not None and self.max_atoms < 1:
            raise config_lib.ConfigError(f"max_atoms: a cap must be >= 1 (null: no cap), got {self.max_atoms}")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise config_lib.ConfigError(f"drop_ratio: must be in [0, 1), got {self.drop_ratio}")


class BatchNorm(nnx.Module):
    """`torch.nn.BatchNorm1d` over the real nodes of a padded graph.

    Training (`use_running_average=False`): normalise with the biased batch variance over masked rows
    and update running stats with the unbiased one, as torch does. Eval: use the running stats.
    """

    def __init__(self, dim: int, eps: float, momentum: float, *, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.weight = param(rngs, nnx.initializers.ones, (dim,), ("gin_hidden",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("gin_hidden",), param_dtype)
        self.running_mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
        self.eps, self.momentum = eps, momentum
        self.use_running_average = True

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view(model, use_running_average=...)`."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x `[N, dim]`, mask `[N]` bool (True = real node) -> `[N, dim]` in x's dtype."""
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.running_mean[...], self.running_var[...]
        else:
            m = mask.astype(jnp.float32)[:, None]
            n = m.sum()
            mean = (x32 * m).sum(0) / jnp.maximum(n, 1.0)
            var = (jnp.square(x32 - mean) * m).sum(0) / jnp.maximum(n, 1.0)
            unbiased = jnp.where(n > 1, var * n / jnp.maximum(n - 1.0, 1.0), var)
            mom, seen = self.momentum, n > 0   # a batch without real nodes leaves the stats alone
            self.running_mean[...] = jnp.where(seen, (1 - mom) * self.running_mean[...] + mom * mean,
                                               self.running_mean[...])
            self.running_var[...] = jnp.where(seen, (1 - mom) * self.running_var[...] + mom * unbiased,
                                              self.running_var[...])
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + seen.astype(jnp.int32)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class GINConv(nnx.Module):
    """One GIN layer with bond embeddings: sum of `h_j + e_ij` over in-edges and the self-loop, then MLP."""

    def __init__(self, config: GinConfig, *, rngs: nnx.Rngs):
        d, dt, pdt = config.emb_dim, dtype_of(config.dtype), dtype_of(config.param_dtype)
        kw = dict(use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mlp_0 = Linear(d, 2 * d, axes=("gin_hidden", "gin_hidden"), **kw)
        self.mlp_2 = Linear(2 * d, d, axes=("gin_hidden", "gin_hidden"), **kw)
        emb = dict(axes=("gin_vocab", "gin_hidden"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.edge_embedding1 = Embedding(molecules.NUM_BOND_TYPES, d, **emb)
        self.edge_embedding2 = Embedding(molecules.NUM_BOND_DIRS, d, **emb)

    def __call__(self, h: jax.Array, senders: jax.Array, receivers: jax.Array, bonds: jax.Array) -> jax.Array:
        """h `[N, d]`, senders/receivers `[E]`, bonds `[E, 2]` (no self-loops) -> `[N, d]`."""
        edge = self.edge_embedding1(bonds[:, 0]) + self.edge_embedding2(bonds[:, 1])
        agg = jax.ops.segment_sum(h[senders] + edge, receivers, num_segments=h.shape[0])
        self_loop = self.edge_embedding1(jnp.array(molecules.SELF_LOOP_BOND)) + self.edge_embedding2(jnp.array(0))
        agg = agg + h + self_loop
        return self.mlp_2(jax.nn.relu(self.mlp_0(agg)))


class GIN(nnx.Module):
    """GraphMVP GIN: `model(graph) -> [N, emb_dim]` node features of a `molecules.batch_graphs` batch.

    Built in eval mode (running BatchNorm statistics, no dropout); `model.train()` / `model.eval()`
    switch. Dropout draws from the `dropout` stream of the `rngs` given here.
    """

    def __init__(self, config: GinConfig, *, rngs: nnx.Rngs):
        if config.num_layers < 2:
            raise ValueError(f"GIN needs at least 2 layers, got num_layers={config.num_layers}")
        self.config = config
        d, dt, pdt = config.emb_dim, dtype_of(config.dtype), dtype_of(config.param_dtype)
        emb = dict(axes=("gin_vocab", "gin_hidden"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.x_embedding1 = Embedding(molecules.NUM_ATOM_TYPES, d, **emb)
        self.x_embedding2 = Embedding(molecules.NUM_CHIRALITY, d, **emb)
        self.gnns = nnx.List([GINConv(config, rngs=rngs) for _ in range(config.num_layers)])
        self.batch_norms = nnx.List([BatchNorm(d, config.bn_eps, config.bn_momentum, param_dtype=pdt, rngs=rngs)
                                     for _ in range(config.num_layers)])
        self.dropout = nnx.Dropout(config.drop_ratio, deterministic=True, rngs=rngs)

    def __call__(self, graph: jraph.GraphsTuple, node_mask: jax.Array | None = None) -> jax.Array:
        """graph: nodes `[N, 2]` atom features, edges `[E, 2]` bond features -> `[N, emb_dim]`.
        node_mask `[N]` (nonzero = real node; default: jraph's padding mask of a single padded batch)."""
        node_mask = jraph.get_node_padding_mask(graph) if node_mask is None else jnp.asarray(node_mask) != 0
        atoms, bonds = jnp.asarray(graph.nodes), jnp.asarray(graph.edges)
        h = self.x_embedding1(atoms[:, 0]) + self.x_embedding2(atoms[:, 1])
        last = self.config.num_layers - 1
        for i, (conv, bn) in enumerate(zip(self.gnns, self.batch_norms)):
            h = bn(conv(h, graph.senders, graph.receivers, bonds), node_mask)
            if i < last:
                h = jax.nn.relu(h)
            h = self.dropout(h)
        return h


def mean_pool(node_features: jax.Array, graph: jraph.GraphsTuple) -> jax.Array:
    """Per-graph mean of node features `[N, d] -> [G, d]` (torch_geometric `global_mean_pool`), with
    padding graphs (and the padding nodes they hold) set to zero."""
    n_graph, n_nodes = graph.n_node.shape[0], node_features.shape[0]
    graph_of_node = jnp.repeat(jnp.arange(n_graph), graph.n_node, total_repeat_length=n_nodes)
    sums = jax.ops.segment_sum(node_features, graph_of_node, num_segments=n_graph)
    means = sums / jnp.maximum(graph.n_node, 1)[:, None].astype(sums.dtype)
    return jnp.where(jraph.get_graph_padding_mask(graph)[:, None], means, 0)
