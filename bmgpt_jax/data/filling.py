"""How a window's encoded examples become batches (`pipeline.BatchIterator`): one example a row, or packed.

`fill_batches` sorts by length and fills a fixed number of batches, one example a row, so each batch pads
to a short bucket; `pack_rows` (`data.pack`) lays several examples end to end in each row of the last
bucket, in as many batches as the examples' tokens and the graph/protein budgets take. Both keep every
batch inside `Budget`; an example that breaks a budget on its own never reaches them (`usable` sets it
aside and counts it first).
"""
from __future__ import annotations

from collections import Counter

from .examples import Budget, Encoded


def usable(encoded: list[Encoded | str], budget: Budget) -> tuple[list[Encoded], Counter, Counter]:
    """The examples a batch can hold; the others counted by reason (a `DROP_REASONS` key), and the plain
    text cut to the last bucket (`truncated` examples, `truncated_tokens`)."""
    good, dropped, cut = [], Counter(), Counter()
    for e in encoded:
        broken = None if isinstance(e, str) else budget.exceeded((0, 0, 0, 0), e.budget, 0)
        if isinstance(e, str) or broken:
            dropped[e if isinstance(e, str) else f"over_{broken}_budget"] += 1
        else:
            good.append(e)
            if e.cut:
                cut.update(truncated=1, truncated_tokens=e.cut)
    return good, dropped, cut


def fill_batches(good: list[Encoded], budget: Budget, num_batches: int) -> tuple[list[list[Encoded]], Counter]:
    """Sort by length and fill at most `num_batches` batches, one example a row, greedily within `budget`;
    returns the batches and `{"over_<budget>_budget": n}` for the examples left out.

    An example that no longer fits the last batch is dropped as over the budget that closed batches
    early (rows never do: the pipeline computes the batch count from the rows)."""
    batches: list[list[Encoded]] = [[]]
    used = (0, 0, 0, 0)
    closed_by: Counter[str] = Counter()                                  # budget -> batches it closed early
    dropped: Counter[str] = Counter()
    for e in sorted(good, key=lambda e: e.length):
        broken = budget.exceeded(used, e.budget, len(batches[-1]))
        if broken:
            if len(batches) == num_batches:
                early = [b for b, _ in closed_by.most_common() if b != "rows"] or [broken]
                dropped[f"over_{early[0]}_budget"] += 1
                continue
            closed_by[broken] += 1
            batches.append([])
            used = (0, 0, 0, 0)
        batches[-1].append(e)
        used = tuple(u + a for u, a in zip(used, e.budget))
    return batches, dropped


def pack_rows(good: list[Encoded], budget: Budget, T: int) -> list[list[list[Encoded]]]:
    """Batches of rows of examples laid end to end, each row at most `T` positions: first fit, longest
    first. Each example goes into the first batch whose graph/protein budgets still hold it and that has a
    row with room for it (or a row not yet opened), else into a new batch. Nothing is dropped."""
    batches: list[tuple[list[list[Encoded]], list[int], list[int]]] = []  # (rows, row lengths, budget used)
    for e in sorted(good, key=lambda e: -e.length):
        if e.length > T:
            raise ValueError(f"pack_rows: an example of {e.length} positions is longer than a row ({T})")
        for rows, lengths, used in batches:
            if budget.exceeded(used, e.budget, 0):
                continue
            r = next((i for i, n in enumerate(lengths) if n + e.length <= T), len(rows))
            if r < budget.batch:
                if r == len(rows):
                    rows.append([])
                    lengths.append(0)
                rows[r].append(e)
                lengths[r] += e.length
                used[:] = [u + a for u, a in zip(used, e.budget)]
                break
        else:
            batches.append(([[e]], [e.length], list(e.budget)))
    return [rows for rows, _, _ in batches]
