#!/usr/bin/env python3
"""tierbench (`make bench`): tierd's placement quality and overhead beside the kernel's tiering.

On the host: compile the raw C baselines, run the host micro-benchmarks,
boot one lab guest with the judge plugin loaded that runs every (workload,
system) pair and the guest micro-benchmarks (benchmarks/guest.py); then the
limit guest (a fast node big enough for everything, no tiering) and the
overhead guest (no tiering, no judge); then write results/latest.json,
results/latest.md and the PNG plots. See docs/benchmarks.md.

    .venv/bin/python benchmarks/run.py                       # the full run
    .venv/bin/python benchmarks/run.py --systems none,damon --workloads shift \\
        --phase-seconds 20 --micro '' --host-micro '' --results build/bench-dev  # partial
    .venv/bin/python benchmarks/run.py --workloads redis --micro '' --host-micro ''  # one app
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "tests")]

import access  # noqa: E402
import micro  # noqa: E402
import report  # noqa: E402
from apps import APPS  # noqa: E402
from guest import SYSTEMS, WORKLOADS  # noqa: E402

from lab import vm  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", choices=vm.KERNELS, default="tierd")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join([*WORKLOADS, *APPS]))
    # The workload sizes in guest.WORKLOADS are chosen for these node sizes.
    parser.add_argument("--fast-mem", default="768M", help="lab node 0 (fast) size")
    parser.add_argument("--slow-mem", default="1536M", help="lab node 1 (slow) size")
    parser.add_argument("--phase-seconds", type=float, default=25)
    parser.add_argument("--shifts", type=int, default=1)
    parser.add_argument("--sample-seconds", type=float, default=1.0)
    parser.add_argument("--micro", default=",".join(micro.GUEST_MICROS),
                        help="guest micro-benchmarks ('' for none)")
    parser.add_argument("--host-micro", default=",".join(micro.HOST_MICROS),
                        help="host micro-benchmarks ('' for none)")
    parser.add_argument("--results", type=Path, default=HERE / "results",
                        help="where latest.json, latest.md and the plots go")
    parser.add_argument("--timeout", type=float, default=4 * 3600,
                        help="time limit of each guest (s)")
    parser.add_argument("--judge", action=argparse.BooleanOptionalAction, default=True,
                        help="count accesses with the judge plugin (default: yes)")
    parser.add_argument("--limit", action=argparse.BooleanOptionalAction, default=True,
                        help="the all-fast limit guest (default: with --judge)")
    parser.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=True,
                        help="the same no-tiering runs without the judge (default: with --judge)")
    return parser.parse_args()


def guest_command(args: argparse.Namespace, *, systems: str, micros: str, judge: bool,
                  all_fast: bool = False) -> str:
    options = {"--systems": systems, "--workloads": args.workloads,
               "--phase-seconds": args.phase_seconds,
               "--shifts": args.shifts, "--sample-seconds": args.sample_seconds,
               "--micro": micros}
    argv = [str(REPO / ".venv/bin/python"), str(HERE / "guest.py"), "--out", "/lab-out/guest.json"]
    for flag, value in options.items():
        argv += [f"{flag}={value}"]
    argv += ["--judge"] * judge + ["--all-fast"] * all_fast
    return shlex.join(argv)


def limit_sizes(args: argparse.Namespace) -> tuple[str, str]:
    """The limit guest's nodes: the fast node holds all the memory, the slow one the least."""
    total = vm.sum_sizes(args.fast_mem, args.slow_mem)
    return total, "256M"


def run_guest(args: argparse.Namespace, command: str, *, judge: bool,
              sizes: tuple[str, str] | None = None) -> dict:
    kernel = vm.lab_kernel(args.kernel)
    fast_mem, slow_mem = sizes or (args.fast_mem, args.slow_mem)
    plugin = None
    if judge:
        ranges = vm.plugin_ram_ranges(fast_mem, slow_mem)
        plugin = vm.Plugin(access.PLUGIN, access.plugin_args(ranges))
    result = vm.boot(kernel, command, fast_mem=fast_mem, slow_mem=slow_mem,
                     timeout=args.timeout, echo=True, plugin=plugin)
    out = result.outdir / "guest.json"
    if not out.exists():
        raise SystemExit(f"tierbench: the guest wrote no results (exit {result.rc}); "
                         f"see {result.outdir}")
    guest = json.loads(out.read_text())
    guest["guest_exit_code"] = result.rc
    return guest


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    micro.build_c()
    host_micro = {}
    for name in filter(None, args.host_micro.split(",")):
        print(f"tierbench: host micro {name}", flush=True)
        host_micro[name] = micro.run_host_micro(name)
    guest = {"runs": [], "micro": {}}
    if args.systems or args.micro:
        print("tierbench: the main guest", flush=True)
        guest = run_guest(args, guest_command(args, systems=args.systems, micros=args.micro,
                                              judge=args.judge), judge=args.judge)
    limit: list[dict] = []
    if args.judge and args.limit and args.workloads:
        print(f"tierbench: the limit guest (fast node {limit_sizes(args)[0]})", flush=True)
        limit = run_guest(args, guest_command(args, systems="none", micros="", judge=True,
                                              all_fast=True),
                          judge=True, sizes=limit_sizes(args))["runs"]
    unjudged: list[dict] = []
    if args.judge and args.overhead and args.workloads:
        print("tierbench: the overhead guest (no judge)", flush=True)
        unjudged = run_guest(args, guest_command(args, systems="none", micros="", judge=False),
                             judge=False)["runs"]
    results = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": guest.get("kernel"), "lab": {"fast_mem": args.fast_mem,
                                               "slow_mem": args.slow_mem,
                                               "limit_fast_mem": limit_sizes(args)[0]},
        "config": guest.get("config"),
        "results": report.summarize(guest["runs"], limit=limit, unjudged=unjudged),
        "micro": {**host_micro, **guest["micro"]},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    results["bench_seconds"] = time.monotonic() - started
    (args.results / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    table = report.markdown(results)
    (args.results / "latest.md").write_text(table)
    plots = report.plot(results, args.results) if results["results"] else []
    print(table)
    print(f"tierbench: wrote {args.results}/latest.json, latest.md and {len(plots)} plots "
          f"in {results['bench_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
