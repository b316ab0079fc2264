#!/usr/bin/env python3
"""tierbench's driver inside the lab guest: every (workload, system) run, then the micros.

Per run of a synthetic workload: start the workload (its hot set lands on
the slow node, its cold set fills the fast node), start the tiering system,
sample where the hot set is every --sample-seconds with move_pages(2) in
query mode, shift the hot set every --phase-seconds, stop everything and
write the run's record. Per run of an application (apps.py): start and load
it beside the ballast, start the tiering system, drive the application's
client for the same window. With --judge, every run also samples the judge
plugin's count of the workload's accesses per node (access.py). The summary
arithmetic lives in metrics.py; the host (run.py) turns the records into the
report.

    guest.py --out /lab-out/guest.json [--systems none,damon] [--workloads shift,redis]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests" / "lab")]

import access  # noqa: E402
import apps  # noqa: E402
import kstat  # noqa: E402
import metrics  # noqa: E402
import micro  # noqa: E402
import systems  # noqa: E402
from workload import Workload  # noqa: E402
from workloads import Variant  # noqa: E402

SYSTEMS = ("none", "numa_balancing", "damon", "tierd_phys", "tierd_pid")
# Also runnable (--systems): tierd with the benchmark's intervals, a labelled variant.
TUNED_SYSTEMS = ("tierd_phys_tuned", "tierd_pid_tuned")
# Sizes for the lab's 768 MiB fast node, about 620 MiB of it free for the
# benchmark. Before each workload a ballast process fills BALLAST of it with
# pages it never touches (cold memory of another process), leaving about
# 170 MiB: each hot set fits on the fast node, hot + cold + ballast does not.
# Small sets keep migration volumes within what TCG moves in a phase.
BALLAST = "448M"
WORKLOADS = {
    # The lab workload: it starts on the slow node; the swap makes the cold
    # half hot, and the old hot half (or ballast) must leave to make room.
    "shift": {"hot": "128M", "cold": "128M", "start_node": 1},
    # Zipf-like skew over one region; its hot ranks start on the slow node.
    "zipf": {"hot": "64M", "cold": "448M", "start_node": 0},
    # As shift, but the hot half is mapped by 4 processes at once.
    "shared": {"hot": "128M", "cold": "128M", "start_node": 1, "procs": 4},
    # As shift, with 8 processes each owning its share in transparent huge pages.
    "many": {"hot": "128M", "cold": "128M", "start_node": 1, "procs": 8},
    # Do no harm: the lab workload fits the fast node's room beside the ballast,
    # and starts there. Nothing has to move; a tiering system can only lose.
    "fits": {"hot": "48M", "cold": "48M", "start_node": 0},
}
# The applications' data sets are kept small enough to load in minutes under
# TCG with the judge loaded, so their ballast is larger: about 60 MiB of the
# fast node stays free, and each application's data set is over twice that.
APP_BALLAST = "560M"
MIGRATION_COUNTERS = ("pgmigrate_success", "pgmigrate_fail", "pgpromote_success",
                      "pgdemote_kswapd", "pgdemote_direct", "pgdemote_khugepaged",
                      "numa_hint_faults", "numa_pages_migrated")


def make_system(name: str, scratch: Path) -> systems.System:
    if name.startswith("tierd_"):
        mover, _, tuned = name.removeprefix("tierd_").partition("_")
        return systems.Tierd(mover, scratch, tuned=tuned == "tuned")
    return {"none": systems.System, "numa_balancing": systems.NumaBalancing,
            "damon": systems.DamonTiering}[name]()


def start_workload(name: str, all_fast: bool) -> Workload | Variant:
    """Start a synthetic workload; `all_fast` (the limit run) starts it on the fast node."""
    spec = WORKLOADS[name]
    start_node = systems.FAST_NODE if all_fast else spec["start_node"]
    if name in ("shift", "fits"):
        workload: Workload | Variant = Workload.start(spec["hot"], spec["cold"],
                                                      start_node=start_node)
    else:
        workload = Variant.start(name, spec["hot"], spec["cold"], start_node=start_node,
                                 procs=spec.get("procs", 1))
    pin_to_workload_cpu(workload_pids(workload))
    return workload


def pin_to_workload_cpu(pids: list[int]) -> None:
    """Move every thread of `pids` to the vCPU whose accesses the judge counts."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), {access.WORKLOAD_CPU})


class AccessLog:
    """The judge's counts of the workload's accesses, sampled during a run."""

    def __init__(self, judge: bool) -> None:
        self.counts = access.Counts() if judge else None
        self.samples: list[metrics.AccessSample] = []

    def sample(self, t0: float, *, fresh: bool = False) -> None:
        """Record the counts now; `fresh`: wait for ones summed after this call."""
        if self.counts is None:
            return
        reading = self.counts.fresh() if fresh else self.counts.latest()
        self.samples.append(metrics.AccessSample(time.monotonic() - t0, reading.nodes))

    def summary(self) -> dict:
        return metrics.summarize_accesses(self.samples) if len(self.samples) > 1 else {}


def workload_pids(workload: Workload | Variant) -> list[int]:
    return workload.pids() if isinstance(workload, Variant) else [workload.pid]


def share_on(status: np.ndarray, node: int) -> float:
    present = status >= 0
    return float((status[present] == node).sum() / max(1, present.sum()))


def phase_start(workload: Workload | Variant, ballast: Workload, t: float
                ) -> metrics.PhaseStart:
    hot, cold = workload.nodes("hot"), workload.nodes("cold")
    ballast_cold = ballast.nodes("cold")
    return metrics.PhaseStart(
        t=t,
        hot_off_fast=int(((hot >= 0) & (hot != systems.FAST_NODE)).sum()),
        cold_on_fast=int((cold == systems.FAST_NODE).sum()
                         + (ballast_cold == systems.FAST_NODE).sum()),
        fast_free_pages=kstat.free_pages_above_high(systems.FAST_NODE),
    )


def system_seconds(pids: list[int]) -> float:
    return sum(cpu[1] for cpu in map(kstat.task_cpu_seconds, pids) if cpu is not None)


def prepare(workload_name: str, system_name: str) -> tuple[dict, systems.System | None]:
    """The run's record and its system, None (and why, in the record) when unavailable."""
    record: dict = {"workload": workload_name, "system": system_name}
    system = make_system(system_name, Path("/tmp"))
    if reason := system.unavailable():
        record["status"] = f"not available: {reason}"
        return record, None
    reset_memory()
    return record, system


def costs(system: systems.System, before: dict[str, int], after: dict[str, int]) -> dict:
    """What the run's migrations cost: kernel counters, the agent's CPU, failures."""
    counters = {k: after.get(k, 0) - before.get(k, 0) for k in MIGRATION_COUNTERS}
    return dict(vmstat=counters, agent_cpu_seconds=system.agent_cpu_seconds(),
                agent_startup_cpu_seconds=system.startup_cpu,
                migration_failures=counters["pgmigrate_fail"], **system.report())


def run_one(workload_name: str, system_name: str, args: argparse.Namespace) -> dict:
    """One (workload, system) run; returns its record (see docs/benchmarks.md)."""
    record, system = prepare(workload_name, system_name)
    if system is None:
        return record
    ballast = Workload.start("4M", BALLAST, start_node=systems.FAST_NODE, pause=1.0)
    try:
        workload = start_workload(workload_name, args.all_fast)
    except BaseException:
        ballast.stop()
        raise
    pids = workload_pids(workload)
    try:
        before = kstat.vmstat()
        stime_before = system_seconds(pids)
        system.start()  # returns once the system runs (tierd: after its start-up)
        t0 = time.monotonic()
        # Phase 0 starts with the clock: the agent's own memory is in use by then, not
        # room a hot page could have taken (a daemon's start-up allocates on the fast node).
        phases = [phase_start(workload, ballast, 0.0)]
        accesses = AccessLog(args.judge)
        accesses.sample(t0, fresh=True)
        samples = sample_run(workload, ballast, system, phases, t0, args, accesses)
        accesses.sample(t0, fresh=True)
        system.stop()
        elapsed = time.monotonic() - t0
        after = kstat.vmstat()
        record["workload_system_seconds"] = system_seconds(pids) - stime_before
    finally:
        # Both verify every word they hold: a migration must never change data.
        record["intact"] = workload.stop() & ballast.stop()
    spent = costs(system, before, after)
    record.update(
        status="ok", seconds=elapsed, shifts_at=[p.t for p in phases[1:]],
        samples=[asdict(s) for s in samples], phases=[asdict(p) for p in phases], **spent,
        **metrics.summarize_quality(samples, phases, elapsed,
                                    spent["vmstat"]["pgmigrate_success"]),
        **accesses.summary(),
    )
    return record


def run_app(app_name: str, system_name: str, args: argparse.Namespace) -> dict:
    """One (application, system) run; returns its record (see docs/benchmarks.md)."""
    record, system = prepare(app_name, system_name)
    if system is None:
        return record
    ballast = Workload.start("4M", APP_BALLAST, start_node=systems.FAST_NODE, pause=1.0)
    app = apps.APPS[app_name]()
    try:
        loading = time.monotonic()
        app.start()
        app.load()
        record["load_seconds"] = time.monotonic() - loading
        before = kstat.vmstat()
        stime_before = system_seconds(app.pids())
        system.start()
        t0 = time.monotonic()
        accesses = AccessLog(args.judge)
        accesses.sample(t0, fresh=True)
        throughput = serve_sampled(app, system, accesses, t0, args)
        accesses.sample(t0, fresh=True)
        system.stop()
        elapsed = time.monotonic() - t0
        after = kstat.vmstat()
        record["workload_system_seconds"] = system_seconds(app.pids()) - stime_before
    finally:
        app.stop()
        record["intact"] = ballast.stop()
    spent = costs(system, before, after)
    record.update(
        status="ok", seconds=elapsed, throughput=throughput, throughput_unit=app.unit,
        shifts_at=[], samples=[], pages_migrated=spent["vmstat"]["pgmigrate_success"],
        **spent, **accesses.summary(),
    )
    return record


def serve_sampled(app: apps.App, system: systems.System, accesses: AccessLog, t0: float,
                  args: argparse.Namespace) -> float:
    """Run the application's client for the measured window, sampling as it runs."""
    outcome: dict[str, float | BaseException] = {}

    def client() -> None:
        try:
            outcome["throughput"] = app.serve(args.phase_seconds * (args.shifts + 1))
        except BaseException as e:  # re-raised in the harness's thread
            outcome["error"] = e

    thread = threading.Thread(target=client)
    thread.start()
    tick = 0
    while thread.is_alive():
        tick += 1
        thread.join(max(0.0, t0 + tick * args.sample_seconds - time.monotonic()))
        accesses.sample(t0)
        system.sample()
    if isinstance(error := outcome.get("error"), BaseException):
        raise error
    return float(outcome["throughput"])  # type: ignore[arg-type]


def sample_run(workload: Workload | Variant, ballast: Workload, system: systems.System,
               phases: list[metrics.PhaseStart], t0: float,
               args: argparse.Namespace, accesses: AccessLog) -> list[metrics.Sample]:
    """Sample the hot set's placement until the last phase ends, shifting on schedule."""
    samples: list[metrics.Sample] = []
    end = args.phase_seconds * (args.shifts + 1)
    tick = 0
    while (t := time.monotonic() - t0) < end:
        if t >= args.phase_seconds * len(phases):
            workload.swap()
            phases.append(phase_start(workload, ballast, time.monotonic() - t0))
        status = workload.nodes("hot")
        samples.append(metrics.Sample(time.monotonic() - t0, share_on(status, systems.FAST_NODE)))
        accesses.sample(t0)
        system.sample()
        tick += 1
        time.sleep(max(0.0, t0 + tick * args.sample_seconds - time.monotonic()))
    return samples


def reset_memory() -> None:
    """Start every run from the same free memory: drop clean caches, compact."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    Path("/proc/sys/vm/compact_memory").write_text("1\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--phase-seconds", type=float, default=25)
    parser.add_argument("--shifts", type=int, default=1)
    parser.add_argument("--sample-seconds", type=float, default=1.0)
    parser.add_argument("--micro", default=",".join(micro.GUEST_MICROS),
                        help="guest micro-benchmarks to run ('' for none)")
    parser.add_argument("--judge", action="store_true",
                        help=f"sample the judge plugin's counts ({access.GUEST_COUNTS})")
    parser.add_argument("--all-fast", action="store_true",
                        help="the limit run: synthetic workloads start on the fast node")
    args = parser.parse_args()
    # The judge counts one vCPU: the workload's. Everything else stays off it.
    access.pin_harness()
    result: dict = {"kernel": os.uname().release, "config": {
        **{k: v for k, v in vars(args).items() if k != "out"}, "workload_specs": WORKLOADS,
        "ballast": BALLAST, "app_ballast": APP_BALLAST},
        "runs": [], "micro": {}}
    for workload_name in filter(None, args.workloads.split(",")):
        for system_name in filter(None, args.systems.split(",")):
            print(f"tierbench: {workload_name} under {system_name}", flush=True)
            try:
                run = run_app if workload_name in apps.APPS else run_one
                record = run(workload_name, system_name, args)
            except Exception as e:  # one broken run must not lose the others
                traceback.print_exc()
                record = {"workload": workload_name, "system": system_name,
                          "status": f"failed: {type(e).__name__}: {e}"}
            print(f"tierbench: {summary_line(record)}", flush=True)
            result["runs"].append(record)
            save(args.out, result)
    for name in filter(None, args.micro.split(",")):
        print(f"tierbench: micro {name}", flush=True)
        result["micro"][name] = micro.run_guest_micro(name)
        save(args.out, result)
    return 0


def summary_line(record: dict) -> str:
    head = f"{record['workload']}/{record['system']}: {record['status']}"
    if record["status"] != "ok":
        return head
    head += f", access share fast {record.get('access_share_fast')}"
    if "throughput" in record:
        return (f"{head}, {record['throughput']:.0f} {record['throughput_unit']}, "
                f"agent cpu {record['agent_cpu_seconds']:.2f} s")
    return (f"{head}, hot on fast {record['hot_on_fast_steady']}, "
            f"to 90% {record['seconds_to_90pct']}, churn {record['churn']}, "
            f"agent cpu {record['agent_cpu_seconds']:.2f} s, intact {record['intact']}")


def save(path: Path, result: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
