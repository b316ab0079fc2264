"""Show NUMA nodes, memory tiers, zone capacity, watermarks and PFN ranges.

Capacity figures are in MiB of managed memory (free, and the sum of the
zones' min/low/high/promo watermarks); PFN ranges are [start, end). `tier` is
N of the kernel's memory_tierN, as in `tierd status` and the metrics; `rank`
is its place, 0 the fastest.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tierd.collectors.topology import Node, Topology, read_topology
from tierd.kernel.root import HostRoot
from tierd.vocabulary import PAGE_SIZE

COLUMNS = ("node", "cpus", "tier", "rank", "managed MiB", "free MiB", "min MiB", "low MiB",
           "high MiB", "promo MiB", "pfn ranges")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--root", type=Path, default=Path("/"),
        help="read procfs and sysfs under this directory (default /)",
    )


def compact_list(items: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2,5", the kernel's list format; "-" for none."""
    parts: list[str] = []
    start: int | None = None
    prev: int | None = None
    for item in [*items, None]:
        if start is not None and prev is not None and (item is None or item != prev + 1):
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if start is None:
            start = item
        prev = item
    return ",".join(parts) or "-"


def _mib(pages: int | None) -> str:
    return "-" if pages is None else f"{pages * PAGE_SIZE / 2**20:.0f}"


def _row(node: Node, topo: Topology) -> tuple[str, ...]:
    tier = topo.tier_of(node.id)
    ranges = " ".join(f"{s:#x}-{e:#x}" for s, e in node.pfn_ranges)
    return (
        str(node.id), compact_list(node.cpus),
        "-" if tier is None else str(tier.id), "-" if tier is None else str(tier.rank),
        _mib(node.managed_pages), _mib(node.free_pages), _mib(node.watermark_min),
        _mib(node.watermark_low), _mib(node.watermark_high), _mib(node.watermark_promo),
        ranges or "-",
    )


def format_table(topo: Topology) -> str:
    rows = [COLUMNS, *(_row(n, topo) for n in topo.nodes.values())]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
             for r in rows]
    lines.append("tiers, fast to slow: " + "; ".join(
        f"tier {t.id} (rank {t.rank}, from {t.source}): nodes {compact_list(t.nodes)}"
        for t in topo.tiers))
    lines += [f"problem: {p}" for p in topo.problems]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    topo = read_topology(HostRoot(args.root))
    print(json.dumps(topo.as_dict(), indent=2) if args.json else format_table(topo))
    return 0
