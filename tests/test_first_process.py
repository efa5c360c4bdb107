"""Work only process 0 does while the others wait (`distributed.run_on_first_process`): two JAX processes
on 127.0.0.1 (gloo), as in test_distributed.py.

The wait is on the distributed runtime's key-value store, not in a collective: a dataset build longer than
the 30 s that gloo waits in a collective (here process 0's build sleeps 35 s first) used to abort both
processes (`GetKeyValue() timed out ... cpu:gloo`, then the coordination service's SIGABRT).
"""
import pytest

from bmgpt_jax import distributed
from tests.test_distributed import _run_workers

SLEEP = 35   # seconds: longer than gloo's 30 s collective timeout

WORKER = r"""
import json, os, sys, time
import jax
from bmgpt_jax import distributed
assert distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from jax.experimental import multihost_utils
from bmgpt_jax.data.builders import make_builder, read_split
p = jax.process_index()
result = {}


def slow():
    time.sleep(4)


os.environ["BMGPT_WAIT_HOURS"] = str(1 / 3600)   # one second: the others give up before process 0 is done
try:
    distributed.run_on_first_process(slow, "a slow step")
    result["short wait"] = "ok"
except TimeoutError as e:
    result["short wait"] = str(e)
del os.environ["BMGPT_WAIT_HOURS"]


def fails():
    raise KeyError("no such key")


try:
    distributed.run_on_first_process(fails, "a failing step")
except KeyError as e:
    result["failing"] = e.args[0]
builder = make_builder("chebi20", RAW, OUT)
if p == 0:
    build = builder.download_and_prepare

    def slow_build(*args, **kwargs):
        time.sleep(SLEEP)
        return build(*args, **kwargs)
    builder.download_and_prepare = slow_build
start = time.monotonic()
records = read_split(builder, "test")
result["waited"] = time.monotonic() - start
result["records"] = int(multihost_utils.process_allgather(len(records)).sum())   # the next collective
print("RESULT " + json.dumps(result), flush=True)
"""


def test_the_others_wait_for_a_long_build_and_get_process_0s_error(tmp_path):
    """Process 0 builds a dataset for longer than gloo's collective timeout; the other process waits for it
    (then opens the same build) and both go on to the next collective. Before that, within the same run:
    process 0's failure reaches the other as its type and one line naming process 0, and a wait shorter
    than process 0's work is a TimeoutError naming BMGPT_WAIT_HOURS."""
    raw = tmp_path / "raw"
    (raw / "molecules").mkdir(parents=True)
    for split in ("validation", "test"):
        (raw / "molecules" / f"chebi20_{split}.txt").write_text("CID\tSMILES\tdescription\n3\tCCO\tEthanol.\n")
    script = f"RAW = {str(raw)!r}\nOUT = {str(tmp_path / 'out')!r}\nSLEEP = {SLEEP}\n" + WORKER
    first, other = _run_workers(script, timeout=120)
    assert first["short wait"] == "ok" and first["failing"] == "no such key"
    assert other["short wait"] == ("a slow step: process 0 has not finished after 0.000277778 hour(s) "
                                   "(BMGPT_WAIT_HOURS sets how long the other processes wait)")
    assert other["failing"] == "a failing step failed on process 0: no such key"
    assert first["records"] == other["records"] == 2
    assert other["waited"] > SLEEP - 5     # it waited for process 0's build (started up to 4 s later)


@pytest.mark.parametrize("value, hours", [(None, distributed.WAIT_HOURS), ("", distributed.WAIT_HOURS), ("0.5", 0.5)])
def test_the_wait_is_set_in_hours(monkeypatch, value, hours):
    """`BMGPT_WAIT_HOURS` sets how long the other processes wait; unset or empty: `WAIT_HOURS`."""
    if value is None:
        monkeypatch.delenv("BMGPT_WAIT_HOURS", raising=False)
    else:
        monkeypatch.setenv("BMGPT_WAIT_HOURS", value)
    assert distributed.wait_hours() == hours


@pytest.mark.parametrize("value", ["soon", "0", "-1", "1000"])
def test_a_wait_that_is_not_hours_is_refused(monkeypatch, value):
    monkeypatch.setenv("BMGPT_WAIT_HOURS", value)
    with pytest.raises(ValueError, match=f"^environment variable BMGPT_WAIT_HOURS='{value}' is not a number of "):
        distributed.wait_hours()


def test_one_process_just_runs_it():
    """With one process `run_on_first_process` is the call itself, its error unchanged."""
    ran = []
    distributed.run_on_first_process(lambda: ran.append(1), "x")
    assert ran == [1]

    def full():
        raise OSError("disk full")
    with pytest.raises(OSError, match="^disk full$"):
        distributed.run_on_first_process(full, "x")
