"""`python -m bmgpt_jax.plan`: compile a real-size train step ahead of time and report its memory per device.

Nothing is allocated: the model is built abstractly (`nnx.eval_shape`), the batch is `ShapeDtypeStruct`s,
and the sharded step of `training.step` (the one training runs: trainable subset, AdamW, donation,
logical-axis shardings) is `jit(...).lower(...).compile()`d for the target devices. The compiled
program's `memory_analysis()` then says how many bytes each device needs, so one knows which TPU slice or
GPU count fits before paying for it.

Targets:
  --topology v5e:4x4 | v4:4x4x4 | v5p:4x4x4 | v6e:8x8   the TPU compiler for that slice (needs `libtpu`,
      `pip install -e .[tpu-plan]`; `jax.experimental.topologies` gives compile-only devices on any host)
  --devices N   N virtual CPU devices: the figures are then the *CPU* compiler's (other fusion, layout
      and rematerialisation decisions, no HBM limit), a rough guide only.

Stages (`--stage`, default all that exist):
  lm        LM-only full fine-tune of BioMedGPT-LM-7B (configs/biomedgpt_lm_7b.yaml), text batch.
  align     BioMedGPT-10B stage 2: decoder and both encoders frozen, the adaptors trainable.
  finetune  BioMedGPT-10B, every parameter trainable.
The 10B model is configs/biomedgpt_10b.yaml (LM-7B + GraphMVP GIN + ESM-2 3B + two linear adaptors).

Each row names the attention the step compiles with (decoder/ESM, as `attention: auto` resolves on the
target: splash on TPU) and the loss's logits chunk. `--seq 2048 4096` plans several lengths; `--dense`
adds, beside each row, the same step with plain O(T^2) attention and whole-sequence logits
(`attention=xla`, `loss_chunk_size=0`), the form before issue 12.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies

from bmgpt_jax import config as C
from bmgpt_jax import parallel
from bmgpt_jax.training import optim, step
from bmgpt_jax.models.attention import resolve
from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig, lm_loss
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM

# TPU generation -> (chip config, HBM GiB per chip, accelerator-type prefix, cores per chip in that name)
TPU_CHIPS = {"v4": ("megacore", 32, "v4", 2), "v5p": ("megacore", 95, "v5p", 2), "v5": ("megacore", 95, "v5p", 2),
             "v5e": ("default", 16, "v5litepod", 1), "v6e": ("default", 32, "v6e", 1)}
STAGE_HELP = {"lm": "LM-7B full fine-tune (text)", "align": "10B align (LM+encoders frozen)",
              "finetune": "10B full fine-tune"}
DENSE = {"lm": ["attention=xla", "loss_chunk_size=0"],
         "10b": ["lm.attention=xla", "lm.loss_chunk_size=0", "esm.attention=xla"]}  # --dense: the O(T^2) form
PROTEIN_LEN = 1026  # ESM tokens per protein in the abstract multimodal batch (ESM-2's 1024 residues + 2)
GiB = 1024 ** 3


def tpu_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice, e.g. `v5e:4x4` -> 16 devices, without any TPU attached.

    v4/v5p chips run as one megacore device each; 3-D slices of side >= 4 are tori (wrap-around links).
    TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES are set (if unset) so libtpu does not probe for hosts, and
    ALLOW_MULTIPLE_LIBTPU_LOAD so that several compile-only planners on one host do not fight over libtpu's
    lockfile (there is no TPU to share).
    """
    if importlib.util.find_spec("libtpu") is None:
        raise SystemExit(f"--topology {topology} needs libtpu (pip install -e '.[tpu-plan]'); "
                         "or use --devices N for the CPU compiler's figures")
    gen, _, dims = topology.partition(":")
    if gen not in TPU_CHIPS or not dims:
        raise SystemExit(f"unknown topology {topology!r}: expected GEN:AxB[xC] with GEN in {sorted(TPU_CHIPS)}")
    chip_config, _, accel, per_chip = TPU_CHIPS[gen]
    shape = [int(d) for d in dims.split("x")]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{accel}-{math.prod(shape) * per_chip}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    wrap = tuple(len(shape) == 3 and d >= 4 for d in shape + [1] * (3 - len(shape)))
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=wrap).devices


def host_backend_only() -> None:
    """Keep JAX's runtime on the host CPU (plans never run on an accelerator; with libtpu installed, JAX
    would otherwise probe for a TPU). A no-op once a backend is up, e.g. inside pytest."""
    if not jax._src.xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def cpu_devices(n: int) -> list:
    """`n` virtual CPU devices. Sets `jax_num_cpu_devices` when the backend is not up yet (the CLI's case);
    otherwise the running process must already have >= n (e.g. XLA_FLAGS=--xla_force_host_platform_device_count)."""
    if not jax._src.xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", n)
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise SystemExit(f"--devices {n}: this process has only {len(devices)} CPU devices; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts")
    return devices[:n]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a stage compiles: `make()` builds the module (called under `nnx.eval_shape`), `loss(model, batch)`
    -> (loss_sum, n_tokens), `trainable` regexes for `optim.trainable_filter` (None = every Param),
    `num_params` the count the config says (None: no formula), `multimodal` whether batches carry molecules and proteins."""
    config: Any
    make: Callable[[], Any]
    loss: Callable[[Any, dict], tuple[Any, Any]]
    trainable: tuple[str, ...] | None
    num_params: int | None
    multimodal: bool


def model_spec(stage: str, *, dtype: str, remat: str, overrides: list[str]) -> ModelSpec:
    """The model factory: `lm` = LlamaForCausalLM(7B) with `biomedgpt.lm_loss`; `align`/`finetune` =
    BioMedGPT-10B (configs/biomedgpt_10b.yaml) with `model.loss`; align trains `proj_mol`/`proj_prot` only.

    `overrides` are `key=value` on the stage's config (LlamaConfig for `lm`, e.g. `num_layers=2`;
    BioMedGPTConfig for the others, e.g. `lm.num_layers=2`), applied after the CLI's dtype/remat.
    """
    if stage == "lm":
        base = [f"dtype={dtype}", f"remat={remat}", "scan_layers=true"]
        cfg = C.load(LlamaConfig, "biomedgpt_lm_7b", base + overrides)
        return ModelSpec(cfg, lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), lm_loss, None, cfg.num_params(), False)
    base = [f"lm.dtype={dtype}", f"lm.remat={remat}", "lm.scan_layers=true", f"esm.dtype={dtype}",
            f"esm.remat={str(remat != 'none').lower()}", "esm.scan_layers=true", f"gin.dtype={dtype}"]
    if stage == "align":  # a frozen ESM needs no backward pass: nothing to rematerialise
        base += ["esm.remat=false"]
    cfg = C.load(BioMedGPTConfig, "biomedgpt_10b", base + overrides)
    return ModelSpec(cfg, lambda: BioMedGPT(cfg, rngs=nnx.Rngs(0)), BioMedGPT.loss,
                     (r"^proj_(mol|prot)\.",) if stage == "align" else None, None, True)


def dense_overrides(stage: str) -> list[str]:
    """Overrides giving `stage` plain attention and whole-sequence logits (`--dense`)."""
    return DENSE["lm" if stage == "lm" else "10b"]


def attention_used(spec: ModelSpec, seq: int, mesh, dtype: str) -> tuple[str, int]:
    """(the attention the step runs, as `lm` or `lm/esm`, resolved on `mesh`'s platform; the loss chunk)."""
    lm = spec.config if not spec.multimodal else spec.config.lm
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        name = resolve(lm.attention, seq, seq, dtype, cached=False)
        if spec.multimodal:
            name += "/" + resolve(spec.config.esm.attention, PROTEIN_LEN, PROTEIN_LEN, dtype, cached=False)
    return name, lm.loss_chunk_size


def abstract_batch(batch: int, seq: int, *, multimodal: bool, shards: int, max_atoms: int = 256,
                   protein_len: int = PROTEIN_LEN) -> dict:
    """ShapeDtypeStructs of a global batch (docs/batch_format.md), all int32.

    Text: `[batch, seq]` ids/masks. Multimodal budgets are the worst case of one molecule of `max_atoms`
    atoms and one protein of `protein_len` ESM tokens per row: N = max_atoms*batch nodes, E = 2.25 N edges
    (the pipeline's default edge:node budget ratio), G = batch + 1 graphs (padding graph) rounded up to a
    multiple of `shards` (the data x fsdp size, since every leading dimension is sharded), P = batch proteins.
    """
    def sds(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)
    out = {k: sds(batch, seq) for k in ("input_ids", "attention_mask", "loss_mask")}
    if not multimodal:
        return out
    n, g = max_atoms * batch, -(-(batch + 1) // shards) * shards
    e = -(-(9 * n // 4) // shards) * shards
    out.update(mol_atoms=sds(n, 2), mol_bonds=sds(e, 2), mol_senders=sds(e), mol_receivers=sds(e),
               mol_n_node=sds(g), mol_n_edge=sds(g), mol_slot=sds(n), prot_ids=sds(batch, protein_len),
               prot_mask=sds(batch, protein_len), prot_slot=sds(batch, protein_len))
    return out


def nbytes(tree) -> int:
    """Total bytes of the array leaves (abstract or concrete) of `tree`."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def param_leaves(state) -> list:
    """The arrays of the `nnx.Param`s in `state` (frozen states also hold BatchNorm statistics, RNG counters)."""
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return [x for v in variables if isinstance(v, nnx.Param) for x in jax.tree.leaves(v)]


@dataclasses.dataclass
class Plan:
    """One compiled stage at one sequence length. Counts are global; the `*_bytes` of `memory` are per
    device (from XLA). attention: what the decoder (and ESM) ran, e.g. `splash/splash`; loss_chunk: the
    loss's logits chunk (0: whole sequence)."""
    stage: str
    seq: int
    attention: str
    loss_chunk: int
    params: int
    trainable: int
    expected_params: int | None
    param_bytes: int
    opt_state_bytes: int
    memory: dict[str, int]
    compile_s: float

    @property
    def peak(self) -> int:
        """Live bytes at the step's high-water mark: arguments + outputs - donated aliases + temporaries + code."""
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]


def plan_stage(stage: str, devices: list, *, mesh_shape=(1, -1, 1), batch: int = 16, seq: int = 2048,
               dtype: str = "bfloat16", remat: str = "full", overrides: list[str] = (),
               spec: ModelSpec | None = None) -> Plan:
    """Lower and compile `stage`'s train step for `devices` on a data x fsdp x tensor mesh; nothing is allocated.

    dtype: compute dtype (master params and Adam moments stay float32). remat: the decoder's per-layer
    rematerialisation (full | dots | none). Raises ValueError when the batch does not divide the mesh.
    """
    spec = spec or model_spec(stage, dtype=dtype, remat=remat, overrides=list(overrides))
    mesh = parallel.make_mesh(mesh_shape, devices)
    attention, loss_chunk = attention_used(spec, seq, mesh, dtype)
    graphdef, trainable, frozen = optim.split_trainable(nnx.eval_shape(spec.make), optim.trainable_filter(spec.trainable))
    tx = optim.make_optimizer(optim.OptimConfig(total_steps=1000))  # any length: only compiled
    opt_state = jax.eval_shape(tx.init, trainable)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    abatch = abstract_batch(batch, seq, multimodal=spec.multimodal, shards=shards)
    train_step = step.make_train_step(spec.loss, tx, compute_dtype=None if dtype == "float32" else jnp.dtype(dtype))
    jitted = step.jit_train_step(train_step, graphdef, trainable, frozen, opt_state,
                                 parallel.batch_shardings(abatch, mesh), mesh)
    t0 = time.perf_counter()
    compiled = jitted.lower(trainable, frozen, opt_state, abatch).compile()
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    memory = {k: int(getattr(ma, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    params = param_leaves(trainable) + param_leaves(frozen)
    return Plan(stage, seq, attention, loss_chunk, sum(math.prod(x.shape) for x in params),
                optim.count_params(trainable), spec.num_params, nbytes(params), nbytes(opt_state), memory, seconds)


def format_table(plans: list[Plan], hbm_gib: float | None = None) -> str:
    """The report: one row per stage and length; parameter counts global, GiB columns per device."""
    cols = ["stage", "seq", "attention", "loss chunk", "params", "trainable", "param GiB", "opt GiB", "args/dev",
            "out/dev", "alias/dev", "temp/dev", "code/dev", "peak/dev", "compile s"] + (["fits HBM"] if hbm_gib else [])
    rows = []
    for p in plans:
        m = p.memory
        row = [p.stage, str(p.seq), p.attention, str(p.loss_chunk or "-"), f"{p.params:,}", f"{p.trainable:,}",
               f"{p.param_bytes / GiB:.2f}", f"{p.opt_state_bytes / GiB:.2f}"]
        row += [f"{m[k] / GiB:.2f}" for k in ("argument", "output", "alias", "temp", "generated_code")]
        row += [f"{p.peak / GiB:.2f}", f"{p.compile_s:.1f}"]
        if hbm_gib:
            row.append(("yes" if p.peak <= hbm_gib * GiB else "NO") + f" ({hbm_gib:g})")
        rows.append(row)
    width = [max(len(r[i]) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, width)))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in width])] + [line(r) for r in rows])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bmgpt_jax.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    target = ap.add_mutually_exclusive_group()
    target.add_argument("--topology", help="TPU slice, e.g. v5e:4x4, v4:4x4x4, v5p:4x4x4, v6e:8x8 (needs libtpu)")
    target.add_argument("--devices", type=int, help="N virtual CPU devices (CPU compiler's figures)")
    ap.add_argument("--stage", default="all", choices=["all", *STAGE_HELP],
                    help="; ".join(f"{k}: {v}" for k, v in STAGE_HELP.items()) + "; all (default)")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes; one may be -1 (the rest)")
    ap.add_argument("--batch", type=int, help="global batch rows (default: 16, or one per data x fsdp shard if more)")
    ap.add_argument("--seq", type=int, nargs="+", default=[2048], help="sequence length(s) T (default 2048)")
    ap.add_argument("--dense", action="store_true",
                    help="also compile each row with plain O(T^2) attention and whole-sequence logits")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    ap.add_argument("--remat", default="full", choices=["full", "dots", "none"], help="per-layer remat policy")
    ap.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                    help="stage config override, e.g. num_layers=4 (lm) or lm.num_layers=4 (align/finetune)")
    args = ap.parse_args(argv)
    if args.topology is None and args.devices is None:
        if importlib.util.find_spec("libtpu") is not None:
            args.topology = "v5e:4x4"
        else:
            args.devices = 8
    try:
        args.mesh = tuple(int(s) for s in args.mesh.split(","))
    except ValueError:
        ap.error(f"--mesh {args.mesh!r}: expected three integers data,fsdp,tensor")
    return args


def main(argv=None) -> list[Plan]:
    """The CLI: resolve the devices, compile each stage, print the table; returns the plans."""
    args = parse_args(argv)
    host_backend_only()
    if args.devices is not None:
        devices, hbm = cpu_devices(args.devices), None
        target = f"{len(devices)} virtual CPU devices -- figures from the CPU compiler (XLA:CPU), not a TPU/GPU's"
    else:
        devices, hbm = tpu_devices(args.topology), TPU_CHIPS[args.topology.split(":")[0]][1]
        hosts = len({d.process_index for d in devices})
        target = (f"{args.topology}: {len(devices)} x {devices[0].device_kind} ({hosts} hosts) -- figures from the "
                  f"TPU compiler (libtpu), compile-only devices")
    try:
        mesh = parallel.make_mesh(args.mesh, devices)
    except ValueError as e:
        raise SystemExit(f"plan: --mesh: {e}") from None
    args.batch = args.batch or max(16, mesh.shape["data"] * mesh.shape["fsdp"])
    print(f"plan: {target}\nmesh {dict(mesh.shape)}, batch {args.batch} x seq {'/'.join(map(str, args.seq))}, "
          f"compute {args.dtype}, remat {args.remat}, AdamW (float32 master params and moments)" +
          (f", overrides {args.override}" if args.override else ""), flush=True)
    stages = list(STAGE_HELP) if args.stage == "all" else [args.stage]
    plans = []
    for stage in stages:
        for seq in args.seq:
            for extra in ([[], dense_overrides(stage)] if args.dense else [[]]):
                print(f"compiling {stage}: {STAGE_HELP[stage]}, seq {seq}{' (dense)' if extra else ''} ...", flush=True)
                try:
                    plans.append(plan_stage(stage, devices, mesh_shape=args.mesh, batch=args.batch, seq=seq,
                                            dtype=args.dtype, remat=args.remat, overrides=args.override + extra))
                except ValueError as e:  # a batch that does not divide the mesh, a bad override
                    raise SystemExit(f"plan: {stage}: {e}") from None
                p = plans[-1]
                if p.expected_params is not None and p.params != p.expected_params:
                    print(f"warning: {stage}: {p.params:,} parameters, the config says {p.expected_params:,}")
    print(format_table(plans, hbm))
    print("GiB = 2^30 bytes. params/opt: global; */dev: per device from compiled.memory_analysis(); "
          "peak = args + out - alias (donated) + temp + code. attention: decoder[/ESM]; loss chunk: tokens "
          "of logits at a time (-: the whole sequence).")
    return plans
