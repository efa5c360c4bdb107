"""A BioMedGPT placed on the training mesh for evaluation, and the two jitted things evaluation asks of it.

- `option_logprobs`: for a batch whose `loss_mask` marks one continuation per row (an option appended to
  its prompt), the summed log-probability of those tokens under the model, `[B]`, plus whether each was
  the greedy continuation. Only the continuation's positions reach the vocabulary projection
  (`[B, width, vocab]`, `width` = the longest continuation rounded up to 8), never `[B, T, vocab]`.
- `prompt_embeddings`: the spliced prompt embeddings `[B, T, embed]` that generation decodes from.

Parameters are sharded by the rule table (`step.shard`), batches arrive as global arrays sharded over
`data` x `fsdp`; one compilation per distinct batch shape. Option scores come back replicated, so every
process reads all rows. With several processes the embeddings come back replicated too: the generation
loop hands its result to the host with `np.asarray`, which needs every row addressable in each process.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bmgpt_jax import chat, parallel
from bmgpt_jax.generation import generate
from bmgpt_jax.models.layers import argmax


WIDTH_STEP = 8


class MeshModel:
    """`model` in eval mode (GIN BatchNorm on running statistics, no dropout) with its parameters sharded
    over `mesh`. `module` is the placed model (its `tokenizer` and `config` as the original's)."""

    def __init__(self, model, mesh):
        self.mesh = mesh
        self.tokenizer = chat.tokenizer_of(model)
        graphdef, state = nnx.split(nnx.view(model, use_running_average=True, deterministic=True))
        self.graphdef, self.state = graphdef, parallel.shard(state, mesh)
        self.module = nnx.merge(graphdef, self.state)
        self.config = self.module.config
        replicated = NamedSharding(mesh, P())
        rows = NamedSharding(mesh, parallel.logical_to_spec(("batch",)))
        prompt_out = rows if jax.process_count() == 1 else replicated
        self._logprobs = jax.jit(self._logprobs_fn, static_argnames="width", out_shardings=replicated)
        self._embed = jax.jit(self._embed_fn, out_shardings=(prompt_out, prompt_out))

    def _logprobs_fn(self, state, batch, width: int):
        with parallel.within(self.mesh):
            model = nnx.merge(self.graphdef, state)
            hidden = model.hidden(batch)                                           # [B, T, D]
            target = batch["loss_mask"] * batch["attention_mask"]                  # [B, T]
            start = jnp.argmax(target, axis=1)                                     # first continuation token
            k = jnp.arange(width)
            valid = k[None, :] < jnp.sum(target, axis=1)[:, None]                  # [B, width]
            pos = jnp.minimum(start[:, None] + k[None, :], target.shape[1] - 1)    # target positions
            h = jnp.take_along_axis(hidden, (pos - 1)[..., None], axis=1)          # predicted from t - 1
            logits = model.llm.logits(h)                                           # [B, width, vocab] f32
            ids = jnp.take_along_axis(batch["input_ids"], pos, axis=1)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[..., None], axis=-1)[..., 0]
            greedy = jnp.all(jnp.where(valid, argmax(logits, axis=-1) == ids, True), axis=1)
            return jnp.sum(jnp.where(valid, logp, 0.0), axis=1), greedy

    def _embed_fn(self, state, batch):
        with parallel.within(self.mesh):
            return nnx.merge(self.graphdef, state).embed_inputs(batch), batch["attention_mask"]

    def option_logprobs(self, batch: dict, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(summed log-probability `[B]` float32, greedy `[B]` bool) of each row's continuation (the tokens
        with `loss_mask` 1) in the global `batch`; `width` >= the longest continuation."""
        width = -(-max(width, 1) // WIDTH_STEP) * WIDTH_STEP
        total, greedy = self._logprobs(self.state, batch, width=width)
        return np.asarray(total), np.asarray(greedy)

    def generate(self, batch: dict, config) -> np.ndarray:
        """New token ids `[B, max_new_tokens]` for the global prompt `batch` (`GenerationConfig` options)."""
        embeds, mask = self._embed(self.state, batch)
        return generate(self.module.llm, inputs_embeds=embeds, attention_mask=mask, config=config)
