"""BioMedGPT: the Llama decoder reading molecules (GraphMVP GIN) and proteins (ESM-2) as tokens.

Attribute names are those of OpenBioMed's `BioMedGPTV` (`llm`, `mol_structure_encoder`,
`prot_structure_encoder`, `proj_mol`, `proj_prot`), so its `biomedgpt_10b.pth` maps by name.

Each molecule atom and each ESM position (`<cls>`, residues, `<eos>`) becomes one LM token:
`proj_mol(gin_node_features)` / `proj_prot(esm_last_hidden)` (per token, no activation) are written
into the token-embedding sequence at the flat slots the batch names (docs/batch_format.md). That is a
single static-shape scatter, so any mix of molecules and proteins, several per example, batches with
fixed shapes; padding atoms/residues have slot -1 and never reach the sequence or the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

from bmgpt_jax.models.esm import Esm, EsmConfig
from bmgpt_jax.models.gin import GIN, GinConfig
from bmgpt_jax.models.layers import Linear, dtype_of
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
from bmgpt_jax.models.loss import chunked_cross_entropy
from bmgpt_jax.parallel import constrain

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BioMedGPTConfig:
    """The three sub-models; defaults are BioMedGPT-10B (Llama2-7B + [PAD], ESM-2 3B, GIN 5x300)."""

    lm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    gin: GinConfig = dataclasses.field(default_factory=GinConfig)
    esm: EsmConfig = dataclasses.field(default_factory=lambda: EsmConfig(
        hidden_size=2560, num_layers=36, num_heads=40, intermediate_size=10240))


def graph_from_batch(batch: Batch) -> jraph.GraphsTuple:
    """The padded molecule graph held in a batch's `mol_*` arrays."""
    return jraph.GraphsTuple(nodes=batch["mol_atoms"], edges=batch["mol_bonds"], senders=batch["mol_senders"],
                             receivers=batch["mol_receivers"], n_node=batch["mol_n_node"],
                             n_edge=batch["mol_n_edge"], globals=None)


def _scatter(flat: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """flat `[B*T, D]`; slots `[n]` (-1 = drop; the others distinct, as the batch format promises); values
    `[n, D]` -> flat with those rows replaced.

    Written as a scatter-add onto flat with those rows zeroed rather than a scatter-set: with distinct
    slots the result is the same (0 + v = v exactly), and the gradient of `values` is a plain gather of
    the output's gradient (a scatter-set's transpose scatters and gathers u32 update ids to find each
    row's last writer, which a mesh partitioner re-shards between the token and the node layouts by
    replicating: the 10B align step on a v5e-16 compiled to 8.4 GiB of temporaries per chip, now 6.6)."""
    slots = jnp.where(slots < 0, flat.shape[0], slots)  # out of range: dropped (negative would wrap)
    hit = jnp.zeros(flat.shape[:1], jnp.int32).at[slots].add(1, mode="drop")
    return jnp.where(hit[:, None] > 0, 0, flat).at[slots].add(values.astype(flat.dtype), mode="drop")


class BioMedGPT(nnx.Module):
    """`model(batch)` -> logits `[B, T, vocab]`; `model.loss(batch)` -> (summed answer-token NLL, count)."""

    def __init__(self, cfg: BioMedGPTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.lm.hidden_size
        kw = dict(use_bias=True, dtype=dtype_of(cfg.lm.dtype), param_dtype=dtype_of(cfg.lm.param_dtype), rngs=rngs)
        self.llm = LlamaForCausalLM(cfg.lm, rngs=rngs)
        self.mol_structure_encoder = GIN(cfg.gin, rngs=rngs)
        self.prot_structure_encoder = Esm(cfg.esm, rngs=rngs)
        self.proj_mol = Linear(cfg.gin.emb_dim, d, axes=("gin_hidden", "embed"), **kw)
        self.proj_prot = Linear(cfg.esm.hidden_size, d, axes=(None, "embed"), **kw)

    def mol_tokens(self, batch: Batch) -> jax.Array:
        """Projected per-atom features `[N, lm_hidden]` of the batch's padded graph (real nodes per
        `mol_node_mask` when the batch has one)."""
        return self.proj_mol(self.mol_structure_encoder(graph_from_batch(batch), batch.get("mol_node_mask")))

    def prot_tokens(self, batch: Batch) -> jax.Array:
        """Projected ESM last hidden states `[P, L, lm_hidden]`."""
        return self.proj_prot(self.prot_structure_encoder(batch["prot_ids"], batch["prot_mask"]))

    def embed_inputs(self, batch: Batch) -> jax.Array:
        """Token embeddings with entity tokens spliced in: `[B, T, lm_hidden]`."""
        ids = batch["input_ids"]
        b, t = ids.shape
        x = self.llm.embed(ids)
        flat = x.reshape(b * t, x.shape[-1])
        if "mol_atoms" in batch and batch["mol_atoms"].shape[0] > 0:
            flat = _scatter(flat, batch["mol_slot"], self.mol_tokens(batch))
        if "prot_ids" in batch and batch["prot_ids"].shape[0] > 0:
            prot = self.prot_tokens(batch)
            flat = _scatter(flat, batch["prot_slot"].reshape(-1), prot.reshape(-1, prot.shape[-1]))
        return constrain(flat.reshape(b, t, -1), ("batch", "seq", "act_embed"))

    def hidden(self, batch: Batch) -> jax.Array:
        """Final decoder hidden states `[B, T, lm_hidden]`."""
        return self.llm.model(inputs_embeds=self.embed_inputs(batch), **sequence_mask(batch))

    def __call__(self, batch: Batch) -> jax.Array:
        return self.llm.logits(self.hidden(batch))

    def loss(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """Next-token NLL summed over answer tokens (`loss_mask`), and their count (float32 scalars).

        Position t-1 predicts token t; only targets with `loss_mask[t] = 1` count, so the prompt,
        entity slots and padding never contribute. Logits are formed `lm.loss_chunk_size` tokens at a time.
        """
        return answer_nll(self.llm, self.hidden(batch), batch)


def lm_loss(model: LlamaForCausalLM, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The same loss for a text-only batch on the bare decoder (stage-1 LM pretraining)."""
    return answer_nll(model, model.model(batch["input_ids"], **sequence_mask(batch)), batch)


def sequence_mask(batch: Batch) -> dict[str, jax.Array]:
    """The decoder's mask argument for `batch`: its `segment_ids` when rows are packed (`data.pack`: each
    example attends within itself, positions restart), else its `attention_mask`."""
    key = "segment_ids" if "segment_ids" in batch else "attention_mask"
    return {key: batch[key]}


def answer_nll(lm: LlamaForCausalLM, hidden: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Decoder hidden states `[B, T, embed]` (position t predicts token t+1) -> (summed NLL of the targets
    with `loss_mask = 1`, their count), float32 scalars, through `lm`'s head in chunks of
    `lm.config.loss_chunk_size` tokens (`models.loss.chunked_cross_entropy`)."""
    shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))  # noqa: E731  (the last position predicts nothing)
    weights = shift(batch["loss_mask"] * batch["attention_mask"])
    return chunked_cross_entropy(lm.logits, hidden, shift(batch["input_ids"]), weights, lm.config.loss_chunk_size)
