"""Timing shared by the benchmarks: sides timed in alternating rounds, the order reversed every round.

On a shared, noisy machine a slow spell should hit every side alike, so each round times every side once,
in the order A, B, ... on even rounds and ..., B, A on odd ones; a ratio is then the median over rounds of
the ratio within a round (``paired_ratio``), not the ratio of two medians. Import it from a script of this
folder (Python puts the script's folder on ``sys.path``)::

    from timing import alternate_rounds, median_ms, paired_ratio
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def time_per_call(fn: Callable[[], object], iters: int = 1,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per call of ``fn`` over ``iters`` calls in a row, read on ``clock``."""
    t = clock()
    for _ in range(iters):
        fn()
    return (clock() - t) / iters


def alternate_rounds(fns: Mapping[str, Callable[[], object]], rounds: int, *, iters: int = 1, warmup: int = 0,
                     warmup_each_round: bool = False,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each side in each round: ``warmup`` untimed calls of every side first, then
    ``rounds`` rounds that time ``iters`` calls of every side, the order of the sides reversed every round
    (``warmup_each_round``: one more untimed call of a side right before it is timed)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if warmup_each_round:
                fns[name]()
            times[name].append(time_per_call(fns[name], iters, clock))
    return times


def median_ms(times: Sequence[float]) -> float:
    """The median of times in seconds, in milliseconds."""
    return 1e3 * statistics.median(times)


def paired_ratio(slow: Sequence[float], fast: Sequence[float]) -> float:
    """Median over rounds of ``slow[r] / fast[r]``: how many times faster the ``fast`` side was, per round."""
    return statistics.median(s / f for s, f in zip(slow, fast, strict=True))
