"""`python -m bmgpt_jax.plan --generate`: the memory per device of greedy decoding (or beam search, with
`--num-beams`) at real size, compiled ahead of time for a TPU slice (or virtual CPU devices), before a chat
or evaluation job starts.

The program planned is the one `chat --mesh` and `evaluate` run for each batch: `generation.sampling`'s
(or `generation.beam`'s) jitted decode (the prompt's prefill into the KV cache, then the `max_new_tokens`
loop) of the config's decoder, its parameters in the compute dtype (a converted bfloat16 or float16 checkpoint, as
`convert_weights.py` keeps it) laid out by the rule table on the mesh, the prompt embeddings
`[batch, prompt, embed]` sharded over `data` x `fsdp` as `evaluate` feeds them. The molecule and protein
encoders run in a separate, smaller program before it (the spliced embeddings are its input) and are not
planned here. Nothing is allocated.

`--weight-layouts auto` compiles the same decode with the parameters' physical layouts left to the
compiler (`Format(Layout.AUTO, sharding)`) instead of the row-major layouts arrays are placed in, and names
the weights it lays out otherwise: what serving with weights in the decode's own layouts would save (the
TPU compiler otherwise holds relaid copies of them, docs/plan.md). chat and evaluate do not do that yet.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding

from bmgpt_jax import parallel
from bmgpt_jax.generation.beam import _beam_decode
from bmgpt_jax.generation.options import GenerationConfig
from bmgpt_jax.generation.sampling import _decode
from bmgpt_jax.models.llama import LlamaForCausalLM
from bmgpt_jax.training.compiled import GiB, Phase, fits


@dataclasses.dataclass
class DecodePlan:
    """One planned decode: the batch, the mesh, the parameters' bytes per device and the compiled program."""
    name: str
    mesh: dict
    batch: int
    prompt: int
    new: int
    beams: int                  # 1: greedy (`sampling`), else beam search (`beam`) with this many per row
    dtype: str
    params: int                 # parameters of the decoder (global count)
    params_per_device: int      # bytes one device holds of them
    cache_bytes: int            # the whole KV cache (global)
    program: Phase
    relaid: tuple[str, ...] = ()  # `auto_layouts`: the weights the compiler laid out other than row-major


def plan_decode(cfg, devices: list, new: int, name: str = "", num_beams: int = 1,
                auto_layouts: bool = False) -> DecodePlan:
    """Compile the greedy decode (beam search for `num_beams` > 1) of `new` tokens after prompts of
    `cfg.data.seq_buckets[-1]` positions for `cfg.data.batch_size` rows, `cfg.model.lm` on `cfg.mesh` over
    `devices` (a `TrainConfig`: the plan's options and overrides apply as for training); with
    `auto_layouts` the parameters' layouts are the compiler's choice (see the module docstring)."""
    mesh = parallel.make_mesh(cfg.mesh, devices)
    lm = dataclasses.replace(cfg.model.lm, param_dtype=cfg.compute_dtype, dtype=cfg.compute_dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(lm, rngs=nnx.Rngs(0))))
    params = parallel.abstract_state(state, mesh)
    B, T, dtype = cfg.data.batch_size, cfg.data.seq_buckets[-1], jnp.dtype(cfg.compute_dtype)
    # the rows over the batch axes that divide them, as chat and evaluate place a prompt batch (one
    # question: whole on every device)
    def placed(shape):
        return NamedSharding(mesh, parallel.fitted_spec(shape, ("batch",) + (None,) * (len(shape) - 1), mesh))
    embeds = jax.ShapeDtypeStruct((B, T, lm.hidden_size), dtype, sharding=placed((B, T, lm.hidden_size)))
    mask = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=placed((B, T)))
    options = GenerationConfig(max_new_tokens=new, eos_token_id=lm.eos_token_id, num_beams=num_beams)
    traced = dict(cfg=options, mesh=parallel.mesh_of(params))   # as `generate` calls it
    decode, rest = (_beam_decode, ()) if num_beams > 1 else (_decode, (jax.eval_shape(lambda: jax.random.key(0)),))
    if auto_layouts:
        def decode_state(state, embeds, mask, *rest):
            return decode.__wrapped__(graphdef, state, None, embeds, mask, *rest, **traced)
        formats = jax.tree.map(lambda x: Format(Layout.AUTO, x.sharding), params)
        jitted = jax.jit(decode_state, in_shardings=(formats, embeds.sharding, mask.sharding) + (None,) * len(rest))
        program = Phase.compile(jitted, params, embeds, mask, *rest)
    else:
        program = Phase.compile(decode, graphdef, params, None, embeds, mask, *rest, **traced)
    leaves = jax.tree_util.tree_leaves_with_path(params) if auto_layouts else []
    relaid = tuple(jax.tree_util.keystr(path) for (path, x), order in zip(leaves, program.input_layouts)
                   if order is not None and tuple(order) != tuple(range(x.ndim)))
    cache = 2 * lm.num_layers * B * num_beams * lm.num_kv_heads * (T + new) * lm.dim_per_head * dtype.itemsize
    return DecodePlan(name, dict(mesh.shape), B, T, new, num_beams, cfg.compute_dtype,
                      sum(math.prod(x.shape) for x in jax.tree.leaves(state)), parallel.bytes_per_device(params), cache,
                      program, relaid)


def format_table(plans: list[DecodePlan], hbm_gib: float | None = None) -> str:
    """One row per plan: GiB per device (parameters, the compiled program's arguments, temporaries, peak)."""
    g = lambda b: "OOM" if b is None else f"{b / GiB:.2f}"  # noqa: E731
    cols = ["config", "mesh", "batch x prompt+new", "beams", "dtype", "params", "KV cache GiB", "params/dev", "args/dev",
            "temp/dev", "peak/dev", "gathers MiB", "compile s"] + (["fits HBM"] if hbm_gib else [])
    rows = []
    for p in plans:
        m = p.program.memory
        row = [p.name, "x".join(str(v) for v in p.mesh.values()), f"{p.batch} x {p.prompt}+{p.new}", str(p.beams), p.dtype,
               f"{p.params:,}", g(p.cache_bytes), g(p.params_per_device), g(m.get("argument")), g(m.get("temp")),
               g(p.program.peak), f"{sum(p.program.collectives.get('all-gather', [])) / 2 ** 20:.1f}", f"{p.program.compile_s:.0f}"]
        rows.append(row + ([fits(p.program.peak, hbm_gib) + f" ({hbm_gib:g})"] if hbm_gib else []))
    width = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, width)))  # noqa: E731
    notes = [f"{p.name}: {p.program.error}" for p in plans if p.program.error]
    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(r) for r in rows] + notes)
