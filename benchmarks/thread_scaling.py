"""CPU thread scaling: the same cases timed at several ``torch.set_num_threads`` counts, and each contender's
speed-up from the fewest threads to each other count (time at the fewest / time at that count)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch


@contextlib.contextmanager
def num_threads(count: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(count)``, then restore the count before; None changes nothing."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def counts(threads: Sequence[int] | None) -> list[int | None]:
    """The thread counts to run, ascending and without repeats; [None] (the current count) if none given."""
    if not threads:
        return [None]
    if any(count < 1 for count in threads):
        raise ValueError(f"threads: expected counts >= 1, got {list(threads)}")
    return sorted(set(threads))


def scaling(rows_by_count: dict[int, list[dict]], copy_bytes_per_s: dict[int, float | None]) -> dict:
    """The thread-scaling section of the results: per case and contender, time at the fewest threads / time
    at each other count (2.0 at 2 threads: the work split perfectly), and the copy bandwidth at each count
    (the ceiling of a memory-bound case's scaling). `rows_by_count`: the rows at each count, in the same
    case order; the rows at counts other than the largest are kept here (the results' rows are the largest's)."""
    ordered = sorted(rows_by_count)
    base, largest = ordered[0], ordered[-1]
    cases = []
    for i, base_row in enumerate(rows_by_count[base]):
        speedup = {
            name: {
                str(count): result["median_ms"] / rows_by_count[count][i]["results"][name]["median_ms"]
                for count in ordered[1:]
                if name in rows_by_count[count][i]["results"]
            }
            for name, result in base_row["results"].items()
        }
        cases.append({"family": base_row["family"], "case": base_row["case"], "speedup": speedup})
    return {
        "threads": ordered,
        "base_threads": base,
        "copy_bytes_per_s": {str(count): copy_bytes_per_s.get(count) for count in ordered},
        "cases": cases,
        "rows": [row for count in ordered if count != largest for row in rows_by_count[count]],
    }
