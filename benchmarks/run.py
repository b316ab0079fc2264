#!/usr/bin/env python3
"""tierbench (`make bench`): tierd's placement quality and overhead beside the kernel's tiering.

On the host: compile the raw C baselines, run the host micro-benchmarks,
boot one lab guest that runs every (workload, system) pair and the guest
micro-benchmarks (benchmarks/guest.py), then write results/latest.json,
results/latest.md and the PNG plots. See docs/benchmarks.md.

    .venv/bin/python benchmarks/run.py                       # the full run (~30 min)
    .venv/bin/python benchmarks/run.py --systems none,damon --workloads shift \\
        --phase-seconds 20 --micro '' --results build/bench-dev   # a quick partial run
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

import micro  # noqa: E402
import report  # noqa: E402
from guest import SYSTEMS, WORKLOADS  # noqa: E402

from lab import vm  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", choices=vm.KERNELS, default="tierd")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
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
    parser.add_argument("--timeout", type=float, default=3600, help="guest time limit (s)")
    return parser.parse_args()


def guest_command(args: argparse.Namespace) -> str:
    options = {"--systems": args.systems, "--workloads": args.workloads,
               "--phase-seconds": args.phase_seconds,
               "--shifts": args.shifts, "--sample-seconds": args.sample_seconds,
               "--micro": args.micro}
    argv = [str(REPO / ".venv/bin/python"), str(HERE / "guest.py"), "--out", "/lab-out/guest.json"]
    for flag, value in options.items():
        argv += [f"{flag}={value}"]
    return shlex.join(argv)


def run_guest(args: argparse.Namespace) -> dict:
    kernel = vm.lab_kernel(args.kernel)
    result = vm.boot(kernel, guest_command(args), fast_mem=args.fast_mem,
                     slow_mem=args.slow_mem, timeout=args.timeout, echo=True)
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
    guest = run_guest(args) if args.systems or args.micro else {"runs": [], "micro": {}}
    results = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": guest.get("kernel"), "lab": {"fast_mem": args.fast_mem,
                                               "slow_mem": args.slow_mem},
        "config": guest.get("config"), "results": report.summarize(guest["runs"]),
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
