#!/usr/bin/env python3
"""`make demo`: a hot/cold workload on the two-tier lab, under tierd.

On the host this boots the lab with the tierd kernel and runs itself inside
with --in-guest. In the guest a ballast process fills most of node 0 with
memory it never touches (another program's idle memory), and a workload
starts its hot and cold sets on the slow node: ballast + hot + cold exceed
node 0's free memory. It runs tierd with config/tierd.yaml switched out of its
dry run (the one-line switch the file documents), prints a line per
interval with per-node usage and the hot set's share of the fast tier, swaps
the hot and cold sets halfway, and ends with

    demo: hot_on_fast=F cold_on_slow=F fast_free_mib=N promoted_pages=N demoted_pages=N

It fails when the memory changed, tierd did not exit cleanly, or the fast node
ended with more free memory than the headroom tierd keeps plus 5% of the node:
ballast + workload exceed the fast node, so it should end full.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

LAB = Path(__file__).resolve().parent
REPO = LAB.parent.parent
NODES = Path("/sys/devices/system/node")
CONFIG = REPO / "config" / "tierd.yaml"
METRICS = "http://127.0.0.1:9748/metrics"  # config/tierd.yaml's metrics address
# Free memory the fast node may end with beyond the headroom tierd keeps: 5% of the node.
SLACK_PERCENT = 5.0


def node_meminfo(node: int) -> dict[str, int]:
    """MemTotal/MemFree/MemUsed of one node, in bytes."""
    fields = {}
    for line in (NODES / f"node{node}" / "meminfo").read_text().splitlines():
        parts = line.split()  # "Node 0 MemFree:  123 kB"
        fields[parts[2].rstrip(":")] = int(parts[3]) * 1024
    return fields


def tierd_moves() -> tuple[int, int]:
    """Pages tierd has promoted and demoted so far, from its metrics endpoint."""
    with urllib.request.urlopen(METRICS, timeout=10) as response:
        text = response.read().decode()
    totals = {"promote": 0, "demote": 0}
    for family in text_string_to_metric_families(text):
        if family.name == "tierd_moved_pages":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[sample.labels["direction"]] += int(sample.value)
    return totals["promote"], totals["demote"]


def moving_config(path: Path) -> Path:
    """config/tierd.yaml with `dry_run: false`: the demo moves pages."""
    path.write_text(CONFIG.read_text().replace("\ndry_run: true\n", "\ndry_run: false\n", 1))
    return path


def start_tierd(log: Path, timeout: float = 300) -> subprocess.Popen[bytes]:
    """Start `tierd run` with the shipped config, moving pages; return once it serves metrics."""
    config = moving_config(log.with_suffix(".yaml"))
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tierd", "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tierd exited with {proc.returncode}:\n{log.read_text()}")
        try:
            tierd_moves()
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise TimeoutError(f"tierd served no metrics within {timeout:.0f} s:\n{log.read_text()}")


def usage_line(elapsed: float, placement: object, moves: tuple[int, int]) -> str:
    mib = 1 << 20
    nodes = []
    for node in (0, 1):
        info = node_meminfo(node)
        used, free = info["MemUsed"] // mib, info["MemFree"] // mib
        nodes.append(f"node{node} used {used:5d} MiB free {free:5d} MiB")
    return (f"demo: t={elapsed:5.0f}s  {'  '.join(nodes)}  "
            f"hot_on_fast={placement.hot_on_fast:.2f} cold_on_slow={placement.cold_on_slow:.2f}  "
            f"promoted={moves[0]} demoted={moves[1]}")


def fast_free_limit() -> int:
    """Bytes node 0 may have free at the end: tierd's keep-free target plus the slack."""
    from tierd.collectors.topology import read_topology
    from tierd.config import load

    node = read_topology().nodes[0]
    keep = max(node.watermark_high, node.watermark_promo or 0)
    percent = load(CONFIG).policy.headroom_percent + SLACK_PERCENT
    return (keep + int(node.managed_pages * percent / 100)) * 4096


def in_guest(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(LAB))
    from workload import Workload

    print(f"demo: ballast of {args.ballast} on node 0 (never touched), workload hot={args.hot} "
          f"cold={args.cold} on node 1", flush=True)
    ballast = Workload.start("4M", args.ballast, start_node=0, pause=1.0)
    workload = Workload.start(args.hot, args.cold, start_node=1)
    log = Path("/tmp/tierd-demo.log")
    try:
        tierd = start_tierd(log)
    except (RuntimeError, TimeoutError):
        workload.stop()
        ballast.stop()
        raise
    print(f"demo: tierd running (pid {tierd.pid}, config {CONFIG.relative_to(REPO)})", flush=True)
    start = time.monotonic()
    try:
        for i in range(args.intervals + 1):
            if i == args.intervals // 2 + 1:
                workload.swap()
                print("demo: swapped the hot and cold sets", flush=True)
            print(usage_line(time.monotonic() - start, workload.placement(), tierd_moves()),
                  flush=True)
            if i < args.intervals:
                time.sleep(args.interval)
        final, (promoted, demoted) = workload.placement(), tierd_moves()
        fast_free, limit = node_meminfo(0)["MemFree"], fast_free_limit()
    finally:
        tierd.send_signal(signal.SIGTERM)
        tierd_rc = tierd.wait(120)
        intact = workload.stop() & ballast.stop()
    print(f"demo: tierd exited with {tierd_rc}; workload and ballast memory intact: {intact}",
          flush=True)
    if tierd_rc != 0:
        print(log.read_text()[-4000:], flush=True)
    full = fast_free <= limit
    if not full:
        print(f"demo: the fast node ended with {fast_free >> 20} MiB free, more than the "
              f"{limit >> 20} MiB of headroom and slack", flush=True)
    print(f"demo: hot_on_fast={final.hot_on_fast:.2f} cold_on_slow={final.cold_on_slow:.2f} "
          f"fast_free_mib={fast_free >> 20} promoted_pages={promoted} demoted_pages={demoted}",
          flush=True)
    return 0 if intact and tierd_rc == 0 and full else 1


def on_host(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(LAB))
    import vm

    command = [sys.executable, str(Path(__file__).resolve()), "--in-guest",
               "--hot", args.hot, "--cold", args.cold, "--ballast", args.ballast,
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
    parser.add_argument("--cold", default="384M")
    # Ballast + cold set fit on node 1, so both sets can settle after the swap.
    parser.add_argument("--ballast", default="1280M")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds per line")
    # Long enough for the default config to settle twice: after a swap, the old hot
    # set must read cold for two rounds after its heat decayed (about 50 s).
    parser.add_argument("--intervals", type=int, default=36)
    parser.add_argument("--fast-mem", default="2G")
    parser.add_argument("--slow-mem", default="2G")
    args = parser.parse_args()
    return in_guest(args) if args.in_guest else on_host(args)


if __name__ == "__main__":
    sys.exit(main())
