"""What a training run checks before it builds any data or loads any weights (`loop.run`), so that a bad
config or path fails in seconds with one line, not after an hour of data building or a 13 GB read: the
batch against the mesh's data axes (`check_layout`), every input path and the init sources against the
model config (`check_inputs`), the output folders (`check_run_folders`), and that every process runs the
same settings (`check_same_settings`). `cfg`: the run's `loop.TrainConfig` (not imported: the loop imports
this module).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from bmgpt_jax.config import differences, to_dict
from bmgpt_jax.convert import stream
from bmgpt_jax.distributed import broadcast_json, check_shared_folder, raise_on_every_process
from bmgpt_jax.inputs import check_not_url, check_output_folder


def check_layout(cfg, mesh) -> None:
    """Errors that must come before any compute: batch vs data axes, micro-batching vs processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.data.batch_size // jax.process_count()
    if cfg.data.batch_size % jax.process_count() or cfg.data.batch_size % shards:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} does not divide over the mesh's data axes "
                         f"(data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']} = {shards}) and "
                         f"{jax.process_count()} process(es)")
    entities = () if cfg.stage == "lm" else ("node_budget", "edge_budget", "graph_budget", "protein_budget")
    for name in entities:                        # the lm stage's batches carry no graphs or proteins
        budget = getattr(cfg.data, name)
        if budget and (budget * jax.process_count()) % shards:
            raise ValueError(f"data.{name} {budget} per process does not divide over {shards} data shards")
    if rows < 1:
        raise ValueError(f"data.batch_size {cfg.data.batch_size} is smaller than the process count")


def check_inputs(cfg) -> None:
    """Before any data is built or model loaded: FileNotFoundError listing every given input path (weights,
    configs, tokenizer) that does not exist, then the init sources against the model config
    (`stages.check_sources`: their config.json and tensor shapes, a decoder vocabulary larger than the
    model's; `model.lm.vocab_size: 0` read from the tokenizer as the run will)."""
    paths = {f"init.{f.name}": getattr(cfg.init, f.name) for f in dataclasses.fields(cfg.init) if f.name != "seed"}
    paths["data.tokenizer"] = cfg.data.tokenizer
    missing = [f"{key}={path}" for key, path in paths.items() if path and not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"not found (relative to {Path.cwd()}): {', '.join(missing)}")
    from bmgpt_jax.training import stages
    model = cfg.model
    if (cfg.init.hf_llama or cfg.init.openbiomed) and not model.lm.vocab_size:
        from bmgpt_jax.data.text import load_tokenizer
        lm = dataclasses.replace(model.lm, vocab_size=load_tokenizer(cfg.data.tokenizer).vocab_size)
        model = dataclasses.replace(model, lm=lm)
    stages.check_sources(cfg.stage, model, cfg.init)


def check_run_folders(cfg) -> None:
    """`out_dir` and `checkpoint.dir` are paths the run writes with file operations (a URL such as gs://...
    is refused: mount the bucket instead) that process 0 can create and write in (`inputs.check_output_folder`,
    its verdict shared, so every process stops on it), with several processes the checkpoint folder is one that
    every process sees (`distributed.check_shared_folder`), and the export's `{out_dir}/final` holds
    nothing the export would delete that is not an earlier export (`convert.stream.check_destination`)."""
    check_not_url(cfg.out_dir, "out_dir")
    check_not_url(cfg.checkpoint.dir, "checkpoint.dir")
    problem = None
    if jax.process_index() == 0:
        try:
            check_output_folder(cfg.out_dir, "out_dir")
            check_output_folder(cfg.checkpoint.dir, "checkpoint.dir")
        except ValueError as e:
            problem = str(e)
    problem = broadcast_json(problem)
    if problem:
        raise ValueError(problem)
    check_shared_folder(cfg.checkpoint.dir, "checkpoint.dir")
    if cfg.export:   # the end-of-run export replaces {out_dir}/final: refuse now what it would refuse then
        stream.check_destination(Path(cfg.out_dir) / "final", "dir", keep=cfg.checkpoint.dir)


PER_HOST = ("data.raw_dirs", "data.data_dir", "data.tokenizer", "data.workers", "progress",   # may differ by host
            *(f"init.{k}" for k in ("openbiomed", "lm_config", "esm_config", "hf_llama", "hf_esm", "gin")))


def check_same_settings(cfg, resume: bool) -> None:
    """Stop every process, naming the keys, unless each runs process 0's config (after its overrides) and
    `--resume`; the host-local settings of `PER_HOST` may differ (two paths, not a path and ""). Processes
    that run other step counts, batch sizes, buckets or meshes feed mismatched collectives: a hang on TPU/GPU
    (an abort in gloo)."""
    if jax.process_count() == 1:
        return

    def host_local(d: str) -> bool:   # `key: old -> new` of a PER_HOST key, set on both hosts
        key = d.split(":")[0]
        return any(key == k or key.startswith(k + ".") for k in PER_HOST) and ": '' -> " not in d \
            and not d.endswith(" -> ''")
    mine = json.loads(json.dumps({**to_dict(cfg), "--resume": resume}))   # tuples as lists, as process 0's arrive
    differ = [d for d in differences(broadcast_json(mine), mine) if not host_local(d)]
    raise_on_every_process(ValueError(f"the settings differ from process 0's: {'; '.join(differ)}") if differ else None,
                           "checking that every process runs the same settings")
