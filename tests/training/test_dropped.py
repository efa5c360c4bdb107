"""Dropped-example accounting (`training.dropped.DropTally`) across a resume on another process count,
with the processes' pipelines simulated in one process (their counts summed as the tally's all-gather sums
them)."""
import json
from collections import Counter

from bmgpt_jax.data.pipeline import BatchIterator, DataConfig
from bmgpt_jax.training.dropped import DropTally

# 100 demo records in windows of 16 (batch 8, 2 batches a window), a node budget that drops some
CFG = DataConfig(sources=("demo",), demo_molecules=10, batch_size=8, window_batches=2, seq_buckets=(160,),
                 node_budget=64, num_epochs=1)


class Processes:
    """The pipelines of the `n` processes of one run."""

    def __init__(self, n):
        self.its = [BatchIterator(CFG, process_index=p, process_count=n) for p in range(n)]

    def counts(self, state=None):
        return dict(sum((Counter(it.counts(state)) for it in self.its), Counter()))

    def state(self):
        return self.its[0].state()

    def restore(self, state):
        for it in self.its:
            it.restore(state)

    def step(self):
        for it in self.its:
            next(it)


def test_counts_go_on_when_resumed_on_another_process_count_mid_window():
    """Two processes stop after the first batch of window 0, one process resumes: it moves on to window 1
    (the batches inside window 0 differ with the process count), so window 0 -- read, and counted, by the
    two -- is not read again. The run's counts are the two's plus the one's: every record read once."""
    two = Processes(2)
    tally = DropTally(two, 1.0)
    two.step()
    saved = json.loads(json.dumps(two.state()))
    tally.update(saved)
    meta = json.loads(json.dumps(tally.checkpoint_counts()))
    assert two.counts()["over_node_budget"] > 0 and saved["batch"] == 1

    one = Processes(1)
    one.restore(saved)
    assert (one.state()["window"], one.state()["batch"]) == (1, 0)
    resumed = DropTally(one, 1.0, meta["data_counts"], meta["data_totals"], saved_position=saved)
    batches = 0
    while True:
        try:
            one.step()
        except StopIteration:
            break
        batches += 1
        resumed.update(one.state())
    assert batches > 0
    assert resumed.totals == Counter(two.counts()) + Counter(one.counts())
    assert resumed.totals["examples"] == len(one.its[0].records) == 100


def test_a_restore_at_the_same_position_recounts_the_window_it_re_encodes():
    """On the same process count the restored pipeline re-encodes the window it stands in, so the count
    goes on from the counts before that window (not the totals, which hold it already)."""
    first = Processes(1)
    tally = DropTally(first, 1.0)
    first.step()
    saved = first.state()
    tally.update(saved)
    meta = tally.checkpoint_counts()
    again = Processes(1)
    again.restore(saved)
    resumed = DropTally(again, 1.0, meta["data_counts"], meta["data_totals"], saved_position=saved)
    again.step()
    resumed.update(again.state())
    first.step()
    tally.update(first.state())
    assert resumed.totals == tally.totals


class Fixed:
    """A pipeline whose counts are given."""

    def __init__(self, read, dropped):
        self.c = {"examples": read, "too_long": dropped}

    def counts(self, state=None):
        return self.c


def tally_of(read, dropped, max_dropped=0.05):
    t = DropTally(Fixed(read, dropped), max_dropped)
    t.update({})
    return t


def test_a_short_run_is_judged_beyond_sampling_noise_a_long_one_by_its_share():
    """Below CHECK_AFTER examples only the end of the run judges, and only a share clearly above max_dropped
    (the default config's first 256 examples held 13 over-long ones, 5.1%, where the mix drops 2.8%)."""
    import pytest
    from bmgpt_jax.training.dropped import TooManyDropped, wilson_low
    assert abs(wilson_low(13, 256) - 0.0300) < 5e-4 and abs(wilson_low(500, 1000) - 0.4685) < 5e-4
    assert not tally_of(256, 13).exceeded() and not tally_of(256, 13).exceeded(final=True)
    tally_of(256, 13).check(final=True)
    assert not tally_of(256, 40).exceeded() and tally_of(256, 40).exceeded(final=True)   # 15.6%
    with pytest.raises(TooManyDropped, match="dropped 40 of the 256 examples"):
        tally_of(256, 40).check(final=True)
    assert tally_of(1000, 51).exceeded()                                # from CHECK_AFTER: the share itself
    assert not tally_of(1000, 50).exceeded(final=True)
    assert tally_of(20, 1, max_dropped=0).exceeded(final=True)          # max_dropped 0: any drop
