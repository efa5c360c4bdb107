"""A held-out loss during training: every `eval.every` steps, the answer-token loss over `eval.sources`.

The held-out batches are made by the training data's pipeline settings (tokenizer, prompt, buckets,
batch size, budgets, packing) with `sources=eval.sources`, in order and once (`shuffle` off, `num_epochs`
1), read when the run starts and kept on the host (`eval.max_batches` caps them; 0: the whole set). Each
process reads its own share, as in training (the pipeline stops processes that read different records, so
all hold the same number of batches: a pass is a collective per batch). A pass runs them through the
stage's loss, jitted on the run's mesh with the current parameters (no gradient, nothing updated), and
reports the token-weighted mean `eval_loss = sum of per-token losses / tokens` over all of them, so the
figure does not depend on how examples fall into batches: `metrics.jsonl` (`{"step", "eval_loss",
"eval_tokens", "eval_batches"}`), TensorBoard (`eval/loss`) and a line on the console. Examples the pipeline drops from the held-out set
(too long, over a budget) or cuts short (plain text) are counted and reported once when it is read, never
silently; a held-out set left without an answer token stops the run before the model is built.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bmgpt_jax.config import check_range
from bmgpt_jax.data.examples import check_ids
from bmgpt_jax.data.pipeline import BatchIterator, DataConfig, global_batch
from bmgpt_jax.distributed import per_process
from bmgpt_jax.parallel import batch_shardings, tree_shardings, within
from bmgpt_jax.training.step import LossFn, cast_floating


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The `eval:` section. `every`: steps between held-out passes (0: none; the last step always gets
    one when `every` > 0); `sources`: the held-out data, named as `data.sources` are (e.g.
    `[chebi20:test]`); `max_batches`: batches per pass (0: the whole set)."""

    every: int = 0
    sources: tuple[str, ...] = ()
    max_batches: int = 0

    def __post_init__(self):
        check_range(self, ("every", "max_batches"), 0)
        if self.every and not self.sources:
            raise ValueError("eval.every > 0 needs eval.sources: the held-out data, e.g. eval.sources=[chebi20:test]")


def due(ev: EvalConfig, step: int, last: int) -> bool:
    """Whether step `step` of a run ending at `last` is followed by a held-out pass."""
    return ev.every > 0 and (step % ev.every == 0 or step == last)


class HeldOut:
    """This process's held-out batches and a jitted pass over them on `mesh`.

    `keys`: the batch keys the stage's loss reads (None: all); `lm_vocab` / `esm_vocab`: the tables the ids
    must index (checked once, as training checks its batches); `max_atoms` / `over_cap`: the GIN's cap."""

    def __init__(self, ev: EvalConfig, data: DataConfig, loss_fn: LossFn, mesh, *, keys: Sequence[str] | None,
                 lm_vocab: int, esm_vocab: int | None, compute_dtype=None, max_atoms: int | None = None,
                 over_cap: str = "subsample"):
        self.mesh, self.loss_fn, self.compute_dtype = mesh, loss_fn, compute_dtype
        try:
            it = BatchIterator(dataclasses.replace(data, sources=tuple(ev.sources), shuffle=False, num_epochs=1,
                                                   workers=0), max_atoms=max_atoms, over_cap=over_cap)
        except (KeyError, ValueError, FileNotFoundError) as e:   # the pipeline names data.sources: say which
            message = str(e.args[0] if e.args else e)
            raise type(e)(f"eval.sources: {message.removeprefix('data.sources: ')}") from None
        self.batches: list[dict[str, np.ndarray]] = []
        try:
            for batch in it:
                batch = {k: batch[k] for k in keys if k in batch} if keys else batch
                where = f"held-out batch {len(self.batches) + 1} ({', '.join(ev.sources)})"
                check_ids(batch, lm_vocab, esm_vocab, where=where)
                self.batches.append(batch)
                if len(self.batches) == ev.max_batches:
                    break
            self.read, self.dropped, self.cut = it.read, dict(it.dropped), dict(it.cut)
        finally:
            it.close()
        if not per_process([sum(int(b["loss_mask"].sum()) for b in self.batches)]).sum():   # all stop alike
            raise ValueError(f"eval.sources {list(ev.sources)}: no held-out example has an answer token left "
                             f"({self.describe().removeprefix('held-out set: ')}); see data.seq_buckets and the budgets")
        self._fn: Callable | None = None

    def describe(self) -> str:
        """One line: the batches kept and their rows holding tokens, the examples the pipeline read to make
        them (whole windows), what it dropped of those, per reason, and the plain text it cut short."""
        rows = sum(int(b["attention_mask"].any(-1).sum()) for b in self.batches)
        dropped = sum(self.dropped.values())
        why = f" ({', '.join(f'{n} {r}' for r, n in sorted(self.dropped.items()))})" if dropped else ""
        cut = (f", {self.cut['truncated']} plain-text examples cut to the last bucket ({self.cut['truncated_tokens']} "
               "tokens)" if self.cut.get("truncated") else "")
        return (f"held-out set: {len(self.batches)} batches ({rows} rows) from {self.read} examples read, "
                f"{dropped} dropped{why}{cut}")

    def _compile(self, graphdef: nnx.GraphDef, trainable, frozen) -> Callable:
        t_sh, f_sh = tree_shardings(trainable, self.mesh), tree_shardings(frozen, self.mesh)

        def loss_sums(tr, fr, batch):
            with within(self.mesh):
                model = nnx.merge(graphdef, cast_floating(tr, self.compute_dtype), cast_floating(fr, self.compute_dtype))
                loss_sum, n_tokens = self.loss_fn(model, batch)
            return jnp.stack([loss_sum.astype(jnp.float32), jnp.asarray(n_tokens, jnp.float32)])

        compiled: dict[tuple, Callable] = {}   # one jit per batch shape (bucket)

        def run(tr, fr, batch):
            key = tuple((k, v.shape, v.dtype) for k, v in sorted(batch.items()))
            if key not in compiled:
                shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
                compiled[key] = jax.jit(loss_sums, in_shardings=(t_sh, f_sh, batch_shardings(shapes, self.mesh)),
                                        out_shardings=NamedSharding(self.mesh, P()))
            return compiled[key](tr, fr, batch)
        return run

    def loss(self, graphdef: nnx.GraphDef, trainable, frozen) -> tuple[float, float]:
        """(token-weighted mean loss, tokens) of the held-out set with these parameters (it holds answer
        tokens: `__init__` refuses a set without)."""
        if self._fn is None:
            self._fn = self._compile(graphdef, trainable, frozen)
        total = np.zeros(2, np.float64)
        for batch in self.batches:
            total += np.asarray(jax.device_get(self._fn(trainable, frozen, global_batch(batch, self.mesh))))
        return float(total[0] / total[1]), float(total[1])
