"""tests/children.communicate: children that wait for each other finish, a child past the limit is killed."""
import subprocess
import sys
import time

import pytest

from tests.children import communicate

# writes 1 MB (more than a pipe holds), then waits until the other child has written its file too
PAIR = r"""
import os, sys, time
me, other = sys.argv[1:]
sys.stdout.write("x" * 1_000_000); sys.stdout.flush()
open(me, "w").close()
while not os.path.exists(other):
    time.sleep(0.01)
print("done")
"""


def test_children_waiting_for_each_other_with_full_pipes_finish(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    procs = [subprocess.Popen([sys.executable, "-c", PAIR, *args], stdout=subprocess.PIPE, text=True)
             for args in ((a, b), (b, a))]
    outputs = communicate(procs, timeout=60)
    assert [p.returncode for p in procs] == [0, 0]
    assert all(o == "x" * 1_000_000 + "done\n" for o in outputs)


def test_a_child_past_the_limit_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"],
                            stdout=subprocess.PIPE, text=True)
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        communicate([proc], timeout=2)
    assert proc.poll() is not None and time.monotonic() - start < 30
