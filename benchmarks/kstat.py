"""The few kernel counters the benchmark reads itself, independent of tierd's code.

The harness must not measure tierd with tierd's own readers, so vmstat,
zoneinfo and per-task CPU time are parsed here, directly.
"""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Kernel threads whose CPU time is tiering work whatever the system: reclaim
# (which demotes when demotion is enabled) and compaction.
MM_KTHREADS = ("kswapd", "kcompactd")


def vmstat() -> dict[str, int]:
    counters = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        counters[name] = int(value)
    return counters


def node_pfn_ranges() -> dict[int, tuple[int, int]]:
    """[first, end) PFN of each node's populated zones, from /proc/zoneinfo."""
    ranges: dict[int, tuple[int, int]] = {}
    node = start = spanned = None
    for line in Path("/proc/zoneinfo").read_text().splitlines():
        fields = line.split()
        if line.startswith("Node "):
            node, start, spanned = int(fields[1].rstrip(",")), None, None
        elif fields[:1] == ["spanned"]:
            spanned = int(fields[1])
        elif fields[:1] == ["start_pfn:"] and node is not None and spanned:
            start = int(fields[1])
            lo, hi = ranges.get(node, (start, start + spanned))
            ranges[node] = (min(lo, start), max(hi, start + spanned))
    return ranges


def free_pages_above_high(node: int) -> int:
    """Free pages on `node` above each zone's high watermark (room before reclaim)."""
    total = 0
    current = free = None
    for line in Path("/proc/zoneinfo").read_text().splitlines():
        fields = line.split()
        if line.startswith("Node "):
            current = int(fields[1].rstrip(","))
        elif current == node and fields[:2] == ["pages", "free"]:
            free = int(fields[2])
        elif current == node and fields[:1] == ["high"] and free is not None:
            total += max(0, free - int(fields[1]))
            free = None
    return total


def task_cpu_seconds(pid: int, children: bool = False) -> tuple[float, float] | None:
    """(user, system) CPU seconds of a task, with its reaped children if asked; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    # Fields after "(comm) ": state is index 0, utime 11, stime 12, cutime 13, cstime 14.
    user, system = int(fields[11]), int(fields[12])
    if children:
        user, system = user + int(fields[13]), system + int(fields[14])
    return user / CLK_TCK, system / CLK_TCK


def threads_named(prefixes: tuple[str, ...]) -> list[int]:
    """PIDs of tasks whose comm starts with one of `prefixes`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(prefixes):
            pids.append(int(entry.name))
    return pids


class CpuTracker:
    """CPU seconds used by a changing set of tasks since the tracker started.

    Sample it often: a task that exits between samples loses its last slice,
    and kdamond threads exit when DAMON stops.
    """

    def __init__(self) -> None:
        self.baseline: dict[int, float] = {}
        self.latest: dict[int, float] = {}

    def start(self, pids: list[int]) -> None:
        """Tasks that already ran before the measured run: count only from now."""
        for pid in pids:
            cpu = task_cpu_seconds(pid)
            if cpu is not None:
                self.baseline[pid] = self.latest[pid] = sum(cpu)

    def sample(self, pids: list[int], children: bool = False) -> None:
        for pid in pids:
            cpu = task_cpu_seconds(pid, children)
            if cpu is not None:
                self.baseline.setdefault(pid, 0.0)
                self.latest[pid] = sum(cpu)

    def seconds(self) -> float:
        return sum(self.latest[pid] - self.baseline[pid] for pid in self.latest)
