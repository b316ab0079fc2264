#!/usr/bin/env python3
"""A model of DAMON's region adaptation (Linux 6.12, mm/damon/core.c) around one hot buffer.

What the paddr lab check can ask of DAMON: how much of a touched buffer reads
hot in at least 3 of 5 aggregations once the regions settled, for a given
min_nr_regions. The model follows kdamond_fn per aggregation: one random page
per region per sample (hot ones accessed with probability `access`), then
kdamond_merge_regions (neighbours whose counts differ by <= samples / 10, up
to total size / min_nr_regions, count = size-weighted average), then
kdamond_split_regions (each region cut at random tenths, 3 pieces when the
count did not change). Units are 4 KiB pages.

    tests/lab/damon_model.py --min-nr-regions 10 100 --trials 300
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

MIB = 256  # 4 KiB pages
SAMPLES = 20  # aggr_us / sample_us of the lab check
MAX_NR_REGIONS = 1000


@dataclass
class Region:
    start: int
    end: int
    nr_accesses: int = 0


def sample(regions: list[Region], hot: range, access: float, rng: random.Random) -> None:
    for r in regions:
        r.nr_accesses = sum(rng.randrange(r.start, r.end) in hot and rng.random() < access
                            for _ in range(SAMPLES))


def merge(regions: list[Region], sz_limit: int) -> list[Region]:
    merged: list[Region] = []
    for r in regions:
        left = merged[-1] if merged else None
        if (left and abs(left.nr_accesses - r.nr_accesses) <= SAMPLES // 10
                and r.end - left.start <= sz_limit):
            size_l, size_r = left.end - left.start, r.end - r.start
            left.nr_accesses = (left.nr_accesses * size_l + r.nr_accesses * size_r) // (
                size_l + size_r)
            left.end = r.end
        else:
            merged.append(Region(r.start, r.end, r.nr_accesses))
    return merged


def split(regions: list[Region], pieces: int, rng: random.Random) -> list[Region]:
    """damon_split_regions_of: the left piece is cut again, the right ones follow it."""
    out: list[Region] = []
    for r in regions:
        start, end, rights = r.start, r.end, []
        for _ in range(pieces - 1):
            if end - start <= 2:
                break
            cut = start + rng.randint(1, 9) * (end - start) // 10
            if start < cut < end:
                rights.insert(0, Region(cut, end))
                end = cut
        out += [Region(start, end), *rights]
    return out


def hot_share(regions: list[Region], hot: range) -> float:
    """Share of the hot pages whose region read accessed."""
    inside = sum(max(0, min(r.end, hot.stop) - max(r.start, hot.start))
                 for r in regions if r.nr_accesses > 0)
    return inside / len(hot)


def accessed_span(regions: list[Region], hot: range) -> int:
    """Pages of the regions that read accessed and overlap the hot buffer."""
    return sum(r.end - r.start for r in regions
               if r.nr_accesses > 0 and r.end > hot.start and r.start < hot.stop)


def run(min_nr_regions: int, hot: range, total: int, access: float, strict_settle: bool,
        rng: random.Random, timeout: int = 300) -> float:
    """Share of the hot buffer read hot in >= 3 of 5 aggregations after settling."""
    regions = [Region(0, total // 2), Region(total // 2, total)]
    sz_limit, last_count = total // min_nr_regions, 0

    def aggregate() -> list[Region]:
        nonlocal regions, last_count
        sample(regions, hot, access, rng)
        regions = merge(regions, sz_limit)
        snapshot = [Region(r.start, r.end, r.nr_accesses) for r in regions]
        if len(regions) <= MAX_NR_REGIONS // 2:
            same = len(regions) == last_count and len(regions) < MAX_NR_REGIONS // 3
            last_count = len(regions)
            regions = split(regions, 3 if same else 2, rng)
        return snapshot

    good = 0
    for _ in range(timeout):
        snapshot = aggregate()
        settled = hot_share(snapshot, hot) >= 0.95 and (
            not strict_settle or accessed_span(snapshot, hot) <= 1.1 * len(hot))
        good = good + 1 if settled else 0
        if good == 3:
            break
    snapshots = [aggregate() for _ in range(5)]
    hits = [sum(any(r.start <= page < r.end and r.nr_accesses > 0 for r in s)
                for s in snapshots) for page in range(hot.start, hot.stop, MIB // 16)]
    return sum(h >= 3 for h in hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-nr-regions", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--access", type=float, default=1.0,
                        help="chance that a sample of a hot page finds it accessed")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    total = 5120 * MIB  # the lab's two nodes
    for strict in (False, True):
        for min_nr in args.min_nr_regions:
            rng = random.Random(args.seed)
            shares = sorted(
                run(min_nr, range(start, start + 64 * MIB), total, args.access, strict, rng)
                for start in (rng.randrange(0, 1984 * MIB) for _ in range(args.trials)))
            print(f"min_nr_regions {min_nr:4}, settled {'around' if strict else 'loosely'}: "
                  f"{sum(s < 0.95 for s in shares)}/{args.trials} under 95%, "
                  f"1st percentile {shares[len(shares) // 100]:.1%}, "
                  f"median {shares[len(shares) // 2]:.1%}")


if __name__ == "__main__":
    main()
