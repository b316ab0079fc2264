#!/usr/bin/env python3
"""`make demo`: a hot/cold workload on the two-tier lab, under tierd.

On the host this boots the lab with the tierd kernel and runs itself inside
with --in-guest. In the guest it starts a workload whose hot and cold sets
together exceed node 0's free memory (cold set allocated first, so the hot
set starts on the slow node), runs tierd with config/tierd.yaml, prints a line
per interval with per-node usage and the hot set's share of the fast tier,
swaps the hot and cold sets halfway, and ends with

    demo: hot_on_fast=F cold_on_slow=F promoted_pages=N demoted_pages=N
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

LAB = Path(__file__).resolve().parent
REPO = LAB.parent.parent
NODES = Path("/sys/devices/system/node")


def node_meminfo(node: int) -> dict[str, int]:
    """MemTotal/MemFree/MemUsed of one node, in bytes."""
    fields = {}
    for line in (NODES / f"node{node}" / "meminfo").read_text().splitlines():
        parts = line.split()  # "Node 0 MemFree:  123 kB"
        fields[parts[2].rstrip(":")] = int(parts[3]) * 1024
    return fields


def vmstat() -> dict[str, int]:
    pairs = (line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return {k: int(v) for k, v in pairs}


def migration_counts(before: dict[str, int], after: dict[str, int]) -> tuple[int, int]:
    """Pages promoted and demoted between two /proc/vmstat snapshots."""
    def delta(prefix: str) -> int:
        return sum(after[k] - before.get(k, 0) for k in after if k.startswith(prefix))
    return delta("pgpromote_success"), delta("pgdemote_")


def usage_line(elapsed: float, placement: object) -> str:
    mib = 1 << 20
    nodes = []
    for node in (0, 1):
        info = node_meminfo(node)
        used, free = info["MemUsed"] // mib, info["MemFree"] // mib
        nodes.append(f"node{node} used {used:5d} MiB free {free:5d} MiB")
    return (f"demo: t={elapsed:5.0f}s  {'  '.join(nodes)}  "
            f"hot_on_fast={placement.hot_on_fast:.2f} cold_on_slow={placement.cold_on_slow:.2f}")


def in_guest(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(LAB))
    from workload import Workload

    print(f"demo: starting workload hot={args.hot} cold={args.cold} (cold first, node 0 preferred)",
          flush=True)
    workload = Workload.start(args.hot, args.cold, start_node=0)
    before = vmstat()
    start = time.monotonic()
    print(usage_line(0, workload.placement()), flush=True)
    print("demo: tierd is not running: this is the baseline without a tiering daemon", flush=True)
    for i in range(1, args.intervals + 1):
        time.sleep(args.interval)
        if i == args.intervals // 2 + 1:
            workload.swap()
            print("demo: swapped the hot and cold sets", flush=True)
        print(usage_line(time.monotonic() - start, workload.placement()), flush=True)
    final = workload.placement()
    promoted, demoted = migration_counts(before, vmstat())
    intact = workload.stop()
    print(f"demo: workload memory intact: {intact}", flush=True)
    print(f"demo: hot_on_fast={final.hot_on_fast:.2f} cold_on_slow={final.cold_on_slow:.2f} "
          f"promoted_pages={promoted} demoted_pages={demoted}", flush=True)
    return 0 if intact else 1


def on_host(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(LAB))
    import vm

    command = [sys.executable, str(Path(__file__).resolve()), "--in-guest",
               "--hot", args.hot, "--cold", args.cold,
               "--interval", str(args.interval), "--intervals", str(args.intervals)]
    result = vm.boot(vm.lab_kernel("tierd"), shlex.join(command),
                     fast_mem=args.fast_mem, slow_mem=args.slow_mem)
    if result.rc != 0:
        print(f"demo: the guest failed (exit {result.rc}); its dmesg ends:", file=sys.stderr)
        print("\n".join(result.dmesg.splitlines()[-30:]), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hot", default="384M")
    parser.add_argument("--cold", default="1792M")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds per line")
    parser.add_argument("--intervals", type=int, default=16)
    parser.add_argument("--fast-mem", default="2G")
    parser.add_argument("--slow-mem", default="2G")
    args = parser.parse_args()
    return in_guest(args) if args.in_guest else on_host(args)


if __name__ == "__main__":
    sys.exit(main())
