"""`python -m bmgpt_jax.plan`: compile a real-size training job ahead of time and report its memory per device.

Nothing is allocated. For each training config (default: configs/biomedgpt_10b_{lm,align,finetune}.yaml)
the three phases of the job are planned on the target devices:

  init     the sharded random initialisation training runs (`parallel.sharded_init`: the model's
           variables created by one jit with the rule shardings as outputs), then the optimizer state
           (`step.jit_opt_init`), each `lower().compile()`d; the phase's peak is the larger of the model
           init's and the optimizer init's (plus the parameters alive beside it).
  restore  the state one device holds after an orbax restore (or a sharded pretrained load) into the
           target shardings: trainable + frozen parameters + optimizer state, each leaf's shard shape
           (`sharding.shard_shape`) x item size (`parallel.bytes_per_device`) -- the restore's
           output bytes, and the train step's state arguments.
  step     the sharded train step of `training.step` (trainable subset, AdamW, donation, logical-axis
           shardings) on the batch the pipeline would make: `data.batch_size` rows split over the
           target's hosts, the longest `data.seq_buckets`, each host's graph/protein budgets (`collate`'s
           shapes), `optim.grad_accum` micro-batches.
The figures are the compiled programs' `memory_analysis()`; `fits` compares the largest phase with a device's memory
(a TPU chip's HBM; JAX's share of a GPU's).
`--generate` plans the greedy decode (`--num-beams`: beam search) of chat / evaluate instead
(`bmgpt_jax.training.decode_plan`).

Each row names the attention the step compiles with (decoder/ESM, as `attention: auto` resolves on the
target: splash on TPU) and the loss's logits chunk. `--seq 2048 4096` plans several lengths; `--dense`
adds, beside each row, the same job with plain O(T^2) attention and whole-sequence logits
(`attention=xla`, `loss_chunk_size=0`: the form before issue 12).

Targets (`bmgpt_jax.training.targets`: compile-only devices, nothing attached):
  --topology v5e:4x4 | v4:2x2x4 | v4:4x4x4 | v5p:4x4x4 | v6e:8x8   the TPU compiler for that slice (needs
      `libtpu`, `pip install -e .[tpu-plan]`)
  --topology h100:8 | h100:2x8 | a100:8 | h200:8   the GPU compiler (XLA:GPU) for GPUS or NODESxGPUS of that
      model (needs jax's CUDA plugin, `pip install -e .[gpu]`; no GPU); fits against JAX's share of the
      card (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set)
  --devices N   N virtual CPU devices: the figures are then the *CPU* compiler's (other fusion, layout
      and rematerialisation decisions, no HBM limit), a rough guide only.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math

import jax
import numpy as np
from flax import nnx

from bmgpt_jax import parallel
from bmgpt_jax.data.examples import Budget, collate
from bmgpt_jax.inputs import positive_int
from bmgpt_jax.models.attention import resolve
from bmgpt_jax.training import optim, stages, step
from bmgpt_jax.training.compiled import GiB, Phase, fits
from bmgpt_jax.training.loop import TEXT_KEYS, TrainConfig, load_config
from bmgpt_jax.training.targets import cpu_devices, devices_for, host_backend_only

CONFIGS = ("biomedgpt_10b_lm", "biomedgpt_10b_align", "biomedgpt_10b_finetune")
DENSE = ["model.lm.attention=xla", "model.lm.loss_chunk_size=0", "model.esm.attention=xla"]  # --dense

# CLI option -> the config overrides it stands for (None = not given: the config's value). Adding an
# option to the plan (an attention kind, a loss variant) is one entry here and one `add_argument`.
OPTIONS = {
    "batch": lambda v: [f"data.batch_size={v}"],
    "mesh": lambda v: [f"mesh=[{v}]"],
    "grad_accum": lambda v: [f"optim.grad_accum={v}"],
    "dtype": lambda v: [f"compute_dtype={v}"] + [f"model.{m}.dtype={v}" for m in ("lm", "esm", "gin")],
    "remat": lambda v: [f"model.lm.remat={v}", f"model.esm.remat={str(v != 'none').lower()}"],
}


def abstract_batch(cfg: TrainConfig, processes: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the pipeline feeds the step, as ShapeDtypeStructs (docs/batch_format.md).

    Each of `processes` hosts collates `batch_size / processes` rows of the longest bucket with its own
    graph/protein budgets (`data.examples.collate`'s shapes, proteins `min(max_protein_len, T)` long);
    the global arrays concatenate them; `grad_accum > 1` stacks that many micro-batches in front. The
    `lm` stage keeps the text keys only, as training does.
    """
    d = cfg.data
    if d.batch_size % processes:
        raise ValueError(f"data.batch_size {d.batch_size} does not divide over {processes} hosts")
    T = d.seq_buckets[-1]
    local = collate([], T, Budget(d.batch_size // processes, d.node_budget, d.edge_budget, d.graph_budget,
                                  d.protein_budget), min(d.max_protein_len, T), packed=d.pack)
    keys = [key for key in local if key in TEXT_KEYS or cfg.stage != "lm"]
    k = cfg.optim.grad_accum
    return {key: jax.ShapeDtypeStruct((k,) * (k > 1) + (local[key].shape[0] * processes,) + local[key].shape[1:],
                                      local[key].dtype) for key in keys}


@dataclasses.dataclass
class Plan:
    """One planned job. Counts and `*_bytes` are global; `*_per_device` and the phases' bytes per device."""
    name: str
    stage: str
    seq: int
    attention: str                  # what the decoder (and ESM) compile with, e.g. `splash/splash`
    loss_chunk: int                 # tokens of logits at a time in the loss (0: the whole sequence)
    params: int
    trainable: int
    expected_params: int | None
    param_bytes: int
    opt_state_bytes: int
    params_per_device: int          # trainable + frozen parameters on one device
    state_per_device: int           # restore: trainable + frozen + optimizer state on one device
    init: Phase                     # the model's sharded random init
    opt_init: Phase                 # the optimizer state's sharded init (trainable params as arguments)
    step: Phase
    batch: dict[str, tuple]

    @property
    def init_peak(self) -> int | None:
        """The init phase's high-water mark: the model init, or the optimizer init with every parameter
        alive beside it (`tx.init` reads only the trainable parameters' shapes, so jit passes it none)."""
        if self.init.error or self.opt_init.error:
            return None
        m = self.opt_init.memory
        return max(self.init.peak, self.params_per_device + m["output"] + m["temp"] + m["generated_code"])

    @property
    def peak(self) -> int | None:
        """The job's high-water mark over its phases; None when the compiler refused one (out of memory)."""
        if self.init_peak is None or self.step.error:
            return None
        return max(self.init_peak, self.state_per_device, self.step.peak)


def param_leaves(state) -> list:
    """The arrays of the `nnx.Param`s in `state` (frozen states also hold BatchNorm statistics, RNG counters)."""
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return [x for v in variables if isinstance(v, nnx.Param) for x in jax.tree.leaves(v)]


def nbytes(tree) -> int:
    """Total bytes of the array leaves (abstract or concrete) of `tree`."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def attention_used(cfg: TrainConfig, mesh) -> str:
    """The attention `cfg`'s train step runs, `lm` or `lm/esm`, as resolved on `mesh`'s platform."""
    T, dtype = cfg.data.seq_buckets[-1], cfg.compute_dtype
    with parallel.within(mesh):
        name = resolve(cfg.model.lm.attention, T, T, dtype, cached=False, packed=cfg.data.pack)
        if cfg.stage != "lm":
            P = min(cfg.data.max_protein_len, T)
            name += "/" + resolve(cfg.model.esm.attention, P, P, dtype, cached=False, causal=False)
    return name


def plan_job(cfg: TrainConfig, devices: list, name: str = "", processes: int | None = None) -> Plan:
    """Compile `cfg`'s init and train step for `devices` (its `mesh`) and size its restored state; nothing
    is allocated. `processes`: hosts feeding the batch (default: the devices' distinct process indices).
    Raises ValueError when the batch or a budget does not divide the mesh, or the vocabulary is unresolved."""
    if cfg.model.lm.vocab_size == 0:
        raise ValueError("model.lm.vocab_size is 0 (the tokenizer's): give it, e.g. -o model.lm.vocab_size=32001")
    processes = processes or len({d.process_index for d in devices})
    mesh = parallel.make_mesh(cfg.mesh, devices)
    make, loss_fn = stages.model_factory(cfg.stage, cfg.model)
    patterns = stages.trainable_patterns(cfg.stage, cfg.model, cfg.trainable)
    graphdef, init, _ = parallel.sharded_init(make, mesh)
    _, trainable, frozen = optim.split_trainable(nnx.eval_shape(make), optim.trainable_filter(patterns))
    tx = optim.make_optimizer(cfg.optim)
    opt_init = step.jit_opt_init(tx, trainable, mesh)
    opt_state = jax.eval_shape(tx.init, trainable)
    batch = abstract_batch(cfg, processes)
    lead = cfg.optim.grad_accum > 1
    train_step = step.make_train_step(loss_fn, tx, grad_accum=cfg.optim.grad_accum,
                                      compute_dtype=None if cfg.compute_dtype == "float32" else np.dtype(cfg.compute_dtype),
                                      schedule=optim.make_schedule(cfg.optim))
    jitted = step.jit_train_step(train_step, graphdef, trainable, frozen, opt_state,
                                 parallel.batch_shardings(batch, mesh, microbatched=lead), mesh)
    params = param_leaves(trainable) + param_leaves(frozen)
    per_device = {k: parallel.bytes_per_device(parallel.abstract_state(t, mesh))
                  for k, t in (("trainable", trainable), ("frozen", frozen), ("opt", opt_state))}
    return Plan(name or cfg.stage, cfg.stage, cfg.data.seq_buckets[-1], attention_used(cfg, mesh),
                cfg.model.lm.loss_chunk_size, sum(math.prod(x.shape) for x in params), optim.count_params(trainable),
                cfg.model.lm.num_params() if cfg.stage == "lm" else None, nbytes(params), nbytes(opt_state),
                per_device["trainable"] + per_device["frozen"], sum(per_device.values()), Phase.compile(init),
                Phase.compile(opt_init, trainable), Phase.compile(jitted, trainable, frozen, opt_state, batch),
                {k: v.shape for k, v in batch.items()})


def format_table(plans: list[Plan], hbm_gib: float | None = None) -> str:
    """The report: one row per job; parameter counts and state global, the phases' GiB per device."""
    cols = ["config", "seq", "attention", "loss chunk", "params", "trainable", "state GiB", "init/dev", "restore/dev", "step args/dev",
            "step temp/dev", "step peak/dev", "compile s"] + (["fits HBM"] if hbm_gib else [])
    rows, notes = [], []
    g = lambda b: "OOM" if b is None else f"{b / GiB:.2f}"  # noqa: E731
    for p in plans:
        m = p.step.memory
        row = [p.name, str(p.seq), p.attention, str(p.loss_chunk or "-"), f"{p.params:,}", f"{p.trainable:,}", g(p.param_bytes + p.opt_state_bytes), g(p.init_peak),
               g(p.state_per_device), g(m.get("argument")), g(m.get("temp")), g(p.step.peak),
               f"{p.init.compile_s + p.opt_init.compile_s + p.step.compile_s:.0f}"]
        if hbm_gib:
            row.append(fits(p.peak, hbm_gib) + f" ({hbm_gib:g})")
        rows.append(row)
        notes += [f"{p.name} {phase}: " + (ph.error or ", ".join(f"{k} {g(v)}" for k, v in ph.memory.items()))
                  for phase, ph in (("model init", p.init), ("optimizer init", p.opt_init), ("step", p.step))]
    width = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, width)))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(r) for r in rows] + notes)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bmgpt_jax.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    target = ap.add_mutually_exclusive_group()
    target.add_argument("--topology", help="TPU slice, e.g. v5e:4x4, v4:2x2x4, v5p:4x4x4, v6e:8x8 (needs libtpu), "
                        "or GPU nodes, e.g. h100:8, h100:2x8, a100:8, h200:8 (needs jax's CUDA plugin)")
    target.add_argument("--devices", type=positive_int, help="N virtual CPU devices (CPU compiler's figures)")
    ap.add_argument("--config", action="append", help=f"training config, repeatable (default: {', '.join(CONFIGS)})")
    ap.add_argument("--stage", choices=["lm", "align", "finetune"], help="shorthand for --config biomedgpt_10b_STAGE")
    ap.add_argument("--processes", type=positive_int, help="hosts feeding the batch (default: the target's hosts; CPU: 1)")
    ap.add_argument("--mesh", help="data,fsdp,tensor sizes, one may be -1, written with '=' "
                    "then: --mesh=-1,2,1 (default: the config's)")
    ap.add_argument("--batch", type=positive_int, help="data.batch_size: global rows per micro-batch (default: the config's)")
    ap.add_argument("--grad-accum", dest="grad_accum", type=positive_int, help="optim.grad_accum micro-batches per step")
    ap.add_argument("--seq", type=positive_int, nargs="+", help="sequence length(s) T, one job each (default: the config's longest bucket)")
    ap.add_argument("--dense", action="store_true",
                    help="also plan each job with plain attention and whole-sequence logits (the O(T^2) form)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], help="compute and activation dtype")
    ap.add_argument("--remat", choices=["full", "dots", "none"], help="decoder remat policy (ESM remat on unless none)")
    ap.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                    help="training-config override, e.g. model.lm.num_layers=2 or trainable=[.]")
    ap.add_argument("--generate", action="store_true",
                    help="plan greedy decoding (chat --mesh, evaluate) instead of training: --batch rows (default 8) "
                         "of --seq prompt positions, --new tokens, the config's decoder in the compute dtype")
    ap.add_argument("--new", type=positive_int, help="--generate: new tokens per row (default 256)")
    ap.add_argument("--num-beams", type=positive_int, default=1,
                    help="--generate: plan beam search with this many beams per row (default 1: greedy)")
    ap.add_argument("--weight-layouts", choices=["default", "auto"], default="default",
                    help="--generate: the weights' physical layouts: row-major as placed (default), or the "
                         "compiler's choice (auto: what weights laid out for the decode would save; names them)")
    args = ap.parse_args(argv)
    unset = {"new": None, "num_beams": 1, "weight_layouts": "default"}   # the options of --generate alone
    decode_only = [f"--{key.replace('_', '-')}" for key, value in unset.items() if getattr(args, key) != value]
    if decode_only and not args.generate:
        ap.error(f"{', '.join(decode_only)}: only with --generate")
    if args.generate:
        args.new = args.new or 256
        args.batch = args.batch or 8
        args.config = args.config or [f"biomedgpt_10b_{args.stage or 'finetune'}"]
    if args.topology is None and args.devices is None:
        args.devices = None if importlib.util.find_spec("libtpu") else 8
        args.topology = "v5e:4x4" if args.devices is None else None
    args.configs = args.config or ([f"biomedgpt_10b_{args.stage}"] if args.stage else list(CONFIGS))
    args.overrides = [o for key, fn in OPTIONS.items() if getattr(args, key) is not None
                      for o in fn(getattr(args, key))] + args.override
    return args


def main(argv=None) -> list[Plan]:
    """The CLI: resolve the devices, plan each config, print the table; returns the plans."""
    args = parse_args(argv)
    host_backend_only()
    if args.devices is not None:
        devices, hbm = cpu_devices(args.devices), None
        target = f"{len(devices)} virtual CPU devices -- figures from the CPU compiler (XLA:CPU), not a TPU/GPU's"
    else:
        devices, hbm, compiler = devices_for(args.topology)
        target = (f"{args.topology}: {len(devices)} x {devices[0].device_kind} "
                  f"({len({d.process_index for d in devices})} hosts) -- {compiler}, compile-only devices")
    print(f"plan: {target}" + (f"; overrides {args.overrides}" if args.overrides else ""), flush=True)
    if args.generate:
        return plan_generation(args, devices, hbm)
    plans = []
    jobs = [(name, [f"data.seq_buckets=[{t}]"] if t else [], dense) for name in args.configs
            for t in (args.seq or [None]) for dense in ([False, True] if args.dense else [False])]
    for name, seq, dense in jobs:
        label = name + (" (dense)" if dense else "")
        try:
            cfg = load_config(name, args.overrides + seq + (DENSE if dense else []))
            mesh = parallel.make_mesh(cfg.mesh, devices)
            print(f"compiling {label}: stage {cfg.stage}, mesh {dict(mesh.shape)}, batch {cfg.data.batch_size} x "
                  f"{cfg.optim.grad_accum} micro-batch(es) x seq {cfg.data.seq_buckets[-1]}, compute {cfg.compute_dtype}, "
                  f"remat {cfg.model.lm.remat} (esm {cfg.model.esm.remat}) ...", flush=True)
            plans.append(plan_job(cfg, devices, label, args.processes))
        except ValueError as e:  # a bad override, a batch or budget that does not divide the mesh
            raise SystemExit(f"plan: {name}: {e}") from None
        p = plans[-1]
        if p.expected_params is not None and p.params != p.expected_params:
            print(f"warning: {name}: {p.params:,} parameters, the config says {p.expected_params:,}")
    print(format_table(plans, hbm))
    print("GiB = 2^30 bytes. params, state (params + optimizer state): global; /dev: per device. init: peak of the "
          "jitted sharded init (model, then optimizer state beside the parameters); restore: the state one "
          "device holds (shard shapes x item size); step: compiled.memory_analysis(), peak = args + out - alias "
          "(donated) + temp + code; fits: the largest phase vs a device's memory (TPU: the chip's HBM; GPU: JAX's share of it) (yes: >= 1 GiB spare). attention: "
          "decoder[/ESM]; loss chunk: tokens of logits at a time (-: the whole sequence).")
    return plans


def plan_generation(args, devices: list, hbm: float | None) -> list:
    """`--generate`: each config's (and `--seq`'s) greedy decode planned (`decode_plan`), the table printed."""
    from bmgpt_jax.training import decode_plan as decode
    plans = []
    for name in args.configs:
        for seq in args.seq or [None]:
            try:
                cfg = load_config(name, args.overrides + ([f"data.seq_buckets=[{seq}]"] if seq else []))
                print(f"compiling the decode of {name}: mesh {dict(parallel.make_mesh(cfg.mesh, devices).shape)}, "
                      f"{cfg.data.batch_size} rows x {cfg.data.seq_buckets[-1]} + {args.new} positions, "
                      f"{cfg.compute_dtype} ...", flush=True)
                plans.append(decode.plan_decode(cfg, devices, args.new, name, num_beams=args.num_beams,
                                                auto_layouts=args.weight_layouts == "auto"))
            except ValueError as e:
                raise SystemExit(f"plan: {name}: {e}") from None
    print(decode.format_table(plans, hbm))
    for p in plans if args.weight_layouts == "auto" else ():
        print(f"{p.name} (prompt {p.prompt}): weights laid out other than row-major: {', '.join(p.relaid) or 'none'}")
    print("GiB = 2^30 bytes. params/dev: the decoder's weights one device holds (rule shardings); args/temp/peak: "
          "the compiled decode's memory_analysis() (peak = args + out - alias + temp + code), the KV cache among "
          "its temporaries; gathers: the results of the compiled program's all-gathers, each op once however often a "
          "loop runs it (weights would show here; a step's few activations are what should); the molecule/protein "
          "encoders' program before it is not included.")
    return plans
