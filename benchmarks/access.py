"""Ground-truth access counts from the judge plugin (benchmarks/judge/judge.c).

The host loads the plugin into the lab's QEMU with `plugin_args()`; every
second it appends the cumulative accesses served by each node to COUNTS on
the results share. In the guest, `Counts` reads them back and the harness
cuts its windows from two readings (metrics.py does the arithmetic). The
plugin counts user-mode accesses of the workload's vCPU only: the harness
pins the workload to WORKLOAD_CPU and itself, the tiering systems and the
clients to HARNESS_CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "build" / "judge" / "judge.so"
KNOWN_READS = REPO / "build" / "judge" / "known_reads"
COUNTS = "judge.tsv"
GUEST_COUNTS = Path("/lab-out") / COUNTS
WORKLOAD_CPU, HARNESS_CPU = 1, 0
# A line summed before a wait began may land just after it: the second new
# line is the first one certainly summed after.
FRESH_LINES = 2


@dataclass(frozen=True)
class Reading:
    """The plugin's cumulative totals at one moment."""

    t: float  # host seconds since QEMU started
    nodes: tuple[int, ...]  # accesses served by each node
    other: int  # accesses outside every node (MMIO, firmware)


def parse_line(line: str) -> Reading:
    fields = line.split()
    return Reading(float(fields[0]), tuple(int(f) for f in fields[1:-1]), int(fields[-1]))


def plugin_args(ranges: dict[int, list[tuple[int, int]]], *, user_only: bool = True,
                vcpu: int | None = WORKLOAD_CPU) -> tuple[tuple[str, str], ...]:
    """The plugin's arguments for these node ranges; "{outdir}" is the results share."""
    if not PLUGIN.exists():
        raise FileNotFoundError(f"{PLUGIN} is missing: build it with `make judge`")
    args = [("out", f"{{outdir}}/{COUNTS}"), ("user", "on" if user_only else "off")]
    if vcpu is not None:
        args.append(("vcpu", str(vcpu)))
    for node, spans in sorted(ranges.items()):
        args.append((f"node{node}", ":".join(f"{a:#x}-{b:#x}" for a, b in spans)))
    return tuple(args)


class Counts:
    """The plugin's totals as the guest sees them on the results share."""

    def __init__(self, path: Path = GUEST_COUNTS) -> None:
        self.path = path
        self.offset = 0  # bytes of complete lines read so far
        self.last: Reading | None = None

    def _new_lines(self) -> list[str]:
        with open(self.path, "rb") as counts:
            counts.seek(self.offset)
            data = counts.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line is complete once its newline is there
        self.offset += len(complete)
        lines = complete.decode().splitlines()
        if lines:
            self.last = parse_line(lines[-1])
        return lines

    def latest(self) -> Reading:
        """The newest reading, published up to a second ago."""
        self._new_lines()
        if self.last is None:
            raise RuntimeError(f"{self.path}: the judge plugin has published nothing")
        return self.last

    def fresh(self, timeout: float = 60) -> Reading:
        """A reading summed after this call began (waits for FRESH_LINES new lines)."""
        self._new_lines()
        seen = 0
        deadline = time.monotonic() + timeout
        while (seen := seen + len(self._new_lines())) < FRESH_LINES:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.path}: no new line in {timeout:.0f} s")
            time.sleep(0.2)
        assert self.last is not None
        return self.last


def pin_harness() -> None:
    """Keep this process and its children off the workload's vCPU."""
    os.sched_setaffinity(0, {HARNESS_CPU})


def pin_workload() -> None:
    """preexec_fn of a workload's process: only its accesses are counted."""
    os.sched_setaffinity(0, {WORKLOAD_CPU})
