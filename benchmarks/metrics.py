"""Quality and cost metrics of one tiering run, from its sampled time series.

Pure functions on plain data (no kernel access), so the harness's arithmetic
is unit-tested on synthetic series.

A run is split into phases: phase 0 starts when the tiering system starts,
phase k > 0 when the workload's hot set shifts for the k-th time. Within a
phase, `t` is seconds since the phase started.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

PAGE_SIZE = 4096
GIB = 1 << 30
TARGET_SHARE = 0.9
# The last quarter of a phase is its steady state: by then every system
# had as long as it gets to settle.
STEADY_FRACTION = 0.25


@dataclass(frozen=True)
class Sample:
    """One placement sample of the running workload."""

    t: float  # seconds since the run (phase 0) started
    hot_on_fast: float  # share of the hot set's present pages on the fast node


@dataclass(frozen=True)
class PhaseStart:
    """Where the pages stood when a phase began: what had to move."""

    t: float  # seconds since the run started
    hot_off_fast: int  # hot pages not on the fast node
    cold_on_fast: int  # cold pages on the fast node
    fast_free_pages: int  # free pages on the fast node above its high watermark


def phase_of(samples: Sequence[Sample], start: float, end: float) -> list[Sample]:
    return [s for s in samples if start <= s.t < end]


def seconds_to_share(
    samples: Sequence[Sample], start: float, end: float, share: float = TARGET_SHARE
) -> float | None:
    """Seconds from `start` until the hot set's fast share first reached `share`."""
    for s in phase_of(samples, start, end):
        if s.hot_on_fast >= share:
            return s.t - start
    return None


def steady_share(samples: Sequence[Sample], start: float, end: float) -> float | None:
    """Mean hot-on-fast share over the last STEADY_FRACTION of a phase."""
    tail_start = end - (end - start) * STEADY_FRACTION
    tail = phase_of(samples, tail_start, end)
    if not tail:
        return None
    return sum(s.hot_on_fast for s in tail) / len(tail)


def pages_that_had_to_move(phase: PhaseStart) -> int:
    """Hot pages off the fast node, plus the cold pages that must leave to make room.

    Cold pages on the fast node only have to move when the fast node's free
    memory cannot take the hot pages that arrive.
    """
    room_needed = max(0, phase.hot_off_fast - phase.fast_free_pages)
    return phase.hot_off_fast + min(phase.cold_on_fast, room_needed)


def churn(pages_migrated: int, phases: Sequence[PhaseStart]) -> float | None:
    """Pages migrated per page that had to move (1.0 is ideal, 0 with nothing moved)."""
    needed = sum(pages_that_had_to_move(p) for p in phases)
    if needed == 0:
        return None
    return pages_migrated / needed


def per_gib(cpu_seconds: float, pages_migrated: int) -> float | None:
    """CPU seconds per GiB migrated (None when nothing migrated)."""
    if pages_migrated <= 0:
        return None
    return cpu_seconds / (pages_migrated * PAGE_SIZE / GIB)


def ratio(measured: float | None, baseline: float | None) -> float | None:
    """measured / baseline, or None when either is missing or the baseline is 0."""
    if measured is None or not baseline:
        return None
    return measured / baseline


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize_quality(
    samples: Sequence[Sample], phases: Sequence[PhaseStart], end: float, pages_migrated: int
) -> dict[str, object]:
    """The quality block of one run's result (see docs/benchmarks.md)."""
    bounds = [p.t for p in phases] + [end]
    to_90 = [seconds_to_share(samples, a, b) for a, b in itertools.pairwise(bounds)]
    steady = [steady_share(samples, a, b) for a, b in itertools.pairwise(bounds)]
    return {
        "hot_on_fast_steady": mean(steady),
        "hot_on_fast_steady_per_phase": steady,
        "seconds_to_90pct": to_90,
        "pages_had_to_move": [pages_that_had_to_move(p) for p in phases],
        "pages_migrated": pages_migrated,
        "churn": churn(pages_migrated, phases),
    }


# The lab's HMAT access latencies (tests/lab/vm.py), node 0 fast, node 1 slow.
NODE_LATENCY_NS = (100.0, 300.0)
FAST_NODE = 0


@dataclass(frozen=True)
class AccessSample:
    """The judge plugin's cumulative count of the workload's accesses per node."""

    t: float  # seconds since the run (phase 0) started
    nodes: tuple[int, ...]


def served(before: AccessSample, after: AccessSample) -> tuple[int, ...]:
    """Accesses each node served between two samples."""
    return tuple(b - a for a, b in zip(before.nodes, after.nodes, strict=True))


def access_share_fast(counts: Sequence[int]) -> float | None:
    """Share of the accesses the fast node served (None with no access)."""
    total = sum(counts)
    return counts[FAST_NODE] / total if total else None


def modeled_memory_time(counts: Sequence[int]) -> float | None:
    """Sum of each access's node latency over the same with all on the fast node.

    1.00 is all-DRAM speed. A model of memory latency alone: no caches, no
    bandwidth limits, no queueing under load.
    """
    total = sum(counts)
    if not total:
        return None
    spent = sum(n * NODE_LATENCY_NS[i] for i, n in enumerate(counts))
    return spent / (total * NODE_LATENCY_NS[FAST_NODE])


def access_series(samples: Sequence[AccessSample]) -> dict[str, list]:
    """access_share_fast between consecutive samples that saw a new count."""
    t: list[float] = []
    share: list[float | None] = []
    for before, after in itertools.pairwise(samples):
        if after.nodes != before.nodes:
            t.append(after.t)
            share.append(access_share_fast(served(before, after)))
    return {"t": t, "access_share_fast": share}


# The do-no-harm check compares the lowest share over windows this long: long
# enough to hold thousands of accesses, short enough to catch a dip.
LOW_WINDOW_SECONDS = 5.0


def lowest_share(samples: Sequence[AccessSample], window: float = LOW_WINDOW_SECONDS
                 ) -> float | None:
    """The lowest access_share_fast over any `window` seconds of the run (None if shorter)."""
    lowest: float | None = None
    end = 0
    for begin, first in enumerate(samples):
        end = max(end, begin + 1)
        while end < len(samples) and samples[end].t - first.t < window:
            end += 1
        if end == len(samples):
            break
        share = access_share_fast(served(first, samples[end]))
        if share is not None and (lowest is None or share < lowest):
            lowest = share
    return lowest


def summarize_accesses(samples: Sequence[AccessSample]) -> dict[str, object]:
    """The judge's block of one run's result: the window is the first to the last sample."""
    counts = served(samples[0], samples[-1])
    return {
        "access_share_fast": access_share_fast(counts),
        "access_share_fast_lowest": lowest_share(samples),
        "modeled_memory_time": modeled_memory_time(counts),
        "accesses": list(counts),
        "access_series": access_series(samples),
    }
