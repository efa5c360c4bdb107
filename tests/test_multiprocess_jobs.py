"""Whole jobs as two local processes (gloo): stage 1 training (text-only batches assembled across hosts),
packed windows whose batch counts the processes agree on, and SIGTERM while a job starts. The harness
(`_run_workers`, `_run_commands`) and the lower-level multi-process checks: tests/test_distributed.py."""
import numpy as np

from tests.test_distributed import REPO, _run_commands, _run_workers

PACK_WORKER = r"""
import json, sys
import jax
from bmgpt_jax import distributed
assert distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from bmgpt_jax.data import pipeline
from bmgpt_jax.data.records import Record
own, pack_rows = [], pipeline.pack_rows
pipeline.pack_rows = lambda *a: (lambda rows: own.append(len(rows)) or rows)(pack_rows(*a))
# unshuffled, process 0 reads the even records (cut to a whole row each), process 1 the odd (a line each)
records = [Record((), "", "Kinases phosphorylate proteins. " * 80 if i % 2 == 0 else f"Note {i}.") for i in range(32)]
cfg = pipeline.DataConfig(sources=("demo",), batch_size=4, seq_buckets=(128,), window_batches=4, pack=True,
                          shuffle=False, num_epochs=1)
batches = list(pipeline.BatchIterator(cfg, records=records))
print("RESULT " + json.dumps({"own": own, "batches": len(batches),
                              "empty": sum(int(b["attention_mask"].sum() == 0) for b in batches),
                              "examples": sum(len(set(r[r > 0].tolist())) for b in batches for r in b["segment_ids"])}),
      flush=True)
"""


def test_packing_processes_agree_on_each_windows_batch_count():
    """`data.pack`: a process whose share of a window packs into fewer batches pads with empty ones to the
    count of the process that needs the most (one allgather a window), so every step has a batch on every
    process; nothing is lost."""
    results = _run_workers(PACK_WORKER)
    assert results[0]["own"] == [4, 4] and results[1]["own"] == [1, 1]       # 8 long rows vs 8 lines in one
    assert [r["batches"] for r in results] == [8, 8]
    assert [r["empty"] for r in results] == [0, 6]
    assert sum(r["examples"] for r in results) == 32


def test_stage_one_trains_on_two_processes(tmp_path):
    """The `lm` stage keeps a batch's text keys only; assembling the global batch across hosts (agreeing on
    the bucket, widening, offsetting, stacking micro-batches) must not ask for the molecule and protein keys
    it no longer has: two processes train tiny_lm (packed rows, 2 micro-batches a step) to the end, with a
    held-out pass (each process its share of the packed held-out rows) after steps 2 and 3."""
    train = ["-m", "bmgpt_jax.train", "--config", "tiny_lm", "steps=3", "progress=false", "export=false",
             f"out_dir={tmp_path / 'run'}", "optim.grad_accum=2", "data.demo_molecules=20",
             "eval.every=2", "eval.sources=[demo:test]", "eval.max_batches=2"]
    results = _run_commands(tmp_path, [train, train], timeout=240)
    for i, (code, text) in enumerate(results):
        assert code == 0, f"process {i}:\n{text[-3000:]}"
    assert "steps 1..3: loss" in results[0][1] and "2 process(es)" in results[0][1], results[0][1][-3000:]
    assert all(f"step {s}: held-out loss " in results[0][1] for s in (2, 3)), results[0][1][-3000:]


def test_text_only_batches_widen_offset_and_stack_without_entity_keys():
    """What `global_batch` does to a text-only batch on several hosts, in one process: widened to another
    bucket (`repad`), offset for its block (`offset_for_process`), stacked (`stack_batches`): the text keys
    padded, nothing else asked for or added."""
    from bmgpt_jax.data.examples import repad
    from bmgpt_jax.data.pipeline import offset_for_process, stack_batches
    text = {"input_ids": np.ones((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32),
            "loss_mask": np.ones((2, 4), np.int32), "segment_ids": np.ones((2, 4), np.int32)}
    wide = repad(text, 6, 0)
    assert wide.keys() == text.keys() and all(v.shape == (2, 6) and v[:, 4:].sum() == 0 for v in wide.values())
    assert offset_for_process(wide, 1).keys() == text.keys()
    stacked = stack_batches([text, wide])
    assert stacked.keys() == text.keys() and stacked["input_ids"].shape == (2, 2, 6)


SIGTERM_AT_START = r"""
import os, signal, time
from bmgpt_jax import distributed
assert distributed.initialize()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(30)
print("survived SIGTERM", flush=True)
"""


def test_sigterm_while_a_multi_process_job_starts_stops_it():
    """`jax.distributed.initialize` installs a SIGTERM handler that only logs (its preemption notifier), so a
    two-process run told to stop (`scancel`, a preempted VM) while it was still starting went on to train
    every step. After `distributed.initialize` SIGTERM terminates again, as with one process, until the
    training loop's own handler (save at the next step, then exit) takes over."""
    import signal
    for code, text in _run_commands(REPO, [["-c", SIGTERM_AT_START]] * 2, timeout=60):
        assert code == -signal.SIGTERM and "survived" not in text, (code, text[-2000:])
