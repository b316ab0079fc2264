"""Run tierd's real interval loop on a fabricated host and print what it cost, as JSON.

    python benchmarks/scale/measure.py ROOT --seconds 3600

The daemon is tierd.daemon.Daemon with the shipped config/tierd.yaml except:
moving (not a dry run) through the PID mover, whose move_pages(2) is replaced
by a recorder that reports every page moved (the fabricated files do not
change, so the pages stay where they are); the perf collector off (its
samples would be this machine's, not the fabricated host's). Collectors,
heat, reverse map and policy are tierd's own code, unchanged.

Time is virtual: the idle scan's pacing sleeps and the waits between
intervals advance a clock instead of sleeping, so an hour of intervals takes
only tierd's own CPU time. Between intervals the harness clears the idle
bits of the host's hot blocks (its "accesses"); that and the fabricated
files' page cache are outside tierd's figures.

    python benchmarks/scale/measure.py / --lab --mover phys --seconds 120

--lab is the cross-check on a real kernel (a lab guest, with a workload
running beside it): the same loop and figures on the host's own files, in
real time, through the real mover (pages really move).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE)]

import host as fabricated  # noqa: E402

from tierd.collectors.collector import Pace  # noqa: E402
from tierd.collectors.evidence import Evidence  # noqa: E402
from tierd.collectors.idle import IdleFeed  # noqa: E402
from tierd.config import Config, parse  # noqa: E402
from tierd.daemon import Builder, Daemon, IntervalSummary, node_facts  # noqa: E402
from tierd.kernel.root import HOST, HostRoot  # noqa: E402
from tierd.movers.batches import BatchResult  # noqa: E402
from tierd.movers.mover import MaplessMover, mover_params  # noqa: E402
from tierd.movers.pid import PidMover  # noqa: E402
from tierd.movers.rmap import ReverseMap  # noqa: E402
from tierd.pipeline import Pipeline, build_pipeline  # noqa: E402
from tierd.policy import Plan  # noqa: E402
from tierd.vocabulary import Batch, NodeFacts  # noqa: E402

SHIPPED = REPO / "config" / "tierd.yaml"
PAGE_KIB = 4


class VirtualClock:
    """time.monotonic plus every pause taken: pacing and waits cost no real time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self.offset

    def pause(self, seconds: float) -> None:
        self.offset += max(0.0, seconds)


class RealClock(VirtualClock):
    """Real time: a pause sleeps (the lab cross-check)."""

    def pause(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


def _kib(field_name: str) -> int:
    """A VmHWM / VmRSS line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def _reset_peak() -> None:
    """Start VmHWM over from the current RSS (Linux 4.0+: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


@dataclass
class Stage:
    cpu_seconds: float = 0.0
    max_cpu_seconds: float = 0.0  # the longest run's own CPU: wall time counts other load
    max_wall_seconds: float = 0.0
    peak_over_start: int = 0  # the largest rise of RSS during one run of the stage


@dataclass
class Tally:
    stages: dict[str, Stage] = field(default_factory=dict)
    peak_rss: int = 0
    moved_pages: int = 0
    rounds_at: list[float] = field(default_factory=list)

    def time(self, name: str, clock: VirtualClock) -> _Timed:
        return _Timed(self, self.stages.setdefault(name, Stage()), clock)


class _Timed:
    """CPU, wall time and the RSS rise of one run of a stage."""

    def __init__(self, tally: Tally, stage: Stage, clock: VirtualClock) -> None:
        self.tally, self.stage, self.clock = tally, stage, clock

    def __enter__(self) -> None:
        self.rss = _kib("VmRSS")
        self.tally.peak_rss = max(self.tally.peak_rss, _kib("VmHWM"))
        _reset_peak()
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def __exit__(self, *_: object) -> None:
        cpu = time.process_time() - self.cpu
        self.stage.cpu_seconds += cpu
        self.stage.max_cpu_seconds = max(self.stage.max_cpu_seconds, cpu)
        self.stage.max_wall_seconds = max(self.stage.max_wall_seconds,
                                          time.perf_counter() - self.wall)
        peak = _kib("VmHWM")
        self.tally.peak_rss = max(self.tally.peak_rss, peak)
        self.stage.peak_over_start = max(self.stage.peak_over_start, peak - self.rss)


class MeasuredDaemon(Daemon):
    """The daemon with each stage timed and its memory peak recorded."""

    tally: Tally
    clock: VirtualClock

    def collect(self) -> Evidence:
        with self.tally.time("collect", self.clock):
            evidence = super().collect()
        if evidence.idle:
            self.tally.rounds_at.append(self.clock.now())
        return evidence

    def update_heat(self, evidence: Evidence) -> None:
        with self.tally.time("heat", self.clock):
            super().update_heat(evidence)

    def refresh_mover(self) -> None:
        with self.tally.time("rmap", self.clock):
            super().refresh_mover()

    def decide(self, facts: list[NodeFacts]) -> Plan:
        with self.tally.time("policy", self.clock):
            return super().decide(facts)

    def move(self, plan: Plan):  # type: ignore[no-untyped-def]
        with self.tally.time("move", self.clock):
            return super().move(plan)

    def publish(self, facts: list[NodeFacts], summary: IntervalSummary) -> None:
        with self.tally.time("publish", self.clock):
            super().publish(facts, summary)


def scale_config(mover: str = "pid") -> Config:
    """The shipped config, moving through `mover`, perf off."""
    data = yaml.safe_load(SHIPPED.read_text())
    data["dry_run"] = False
    data["movers"]["kind"] = mover
    data["collectors"]["perf"]["enabled"] = False
    data["metrics"]["enabled"] = False
    return parse(yaml.safe_dump(data).encode(), "config/tierd.yaml (scale)")


class Recorder:
    """move_pages(2) as if every page moved; counts them."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def __call__(self, pid: int, addrs: npt.NDArray[np.uint64], nodes: npt.NDArray[np.int32],
                 statuses: npt.NDArray[np.int32], flags: int) -> int:
        statuses[:] = nodes
        self.tally.moved_pages += int(addrs.size)
        return 0


class PhysRecorder(MaplessMover):
    """A mover without a page map (as the phys mover): records every page as moved."""

    name = "phys-recorder"

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def move(self, batch: Batch, flags: npt.NDArray[np.uint64] | None = None) -> BatchResult:
        self.tally.moved_pages += int(batch.pfns.size)
        result = BatchResult()
        result.succeed(batch.pfns)
        return result


def _builder(clock: VirtualClock, tally: Tally, mover: str):  # type: ignore[no-untyped-def]
    def build(config: Config, root: HostRoot, _pace: Pace) -> Pipeline:
        pipeline = build_pipeline(config, root, Pace(clock.pause))
        for collector in pipeline.collectors:
            if isinstance(collector, IdleFeed):
                collector.clock = collector.scanner.clock = clock.now
        if mover == "pid":
            rmap = ReverseMap(pipeline.process_filter, root)
            pipeline.mover = PidMover(rmap, mover_params(config), root,
                                      move_pages=Recorder(tally))
        else:
            pipeline.mover = PhysRecorder(tally)
        return pipeline
    return build


class Accesses:
    """The host's hot blocks: their idle bits cleared before every interval."""

    def __init__(self, root: Path) -> None:
        self.groups = np.load(root / "hot_blocks.npy")
        self.fd = os.open(root / "sys/kernel/mm/page_idle/bitmap", os.O_WRONLY)
        self.zeros = bytes(fabricated.HOT_GROUP * fabricated.BLOCK_PFNS // 8)

    def touch(self) -> None:
        for block in self.groups.tolist():
            os.pwrite(self.fd, self.zeros, block * fabricated.BLOCK_PFNS // 8)


def _structures(daemon: Daemon) -> dict[str, int]:
    heat = daemon.heat
    idle = sum(r.ages.nbytes + r.live.nbytes for c in daemon.pipeline.collectors
               if isinstance(c, IdleFeed) for r in c.scanner.ranges)
    return {"heat": heat.heat.nbytes, "marks": heat.mark.nbytes,
            "reverse_map": daemon.pipeline.mover.footprint()[1], "idle_ages": idle}


def _extents(daemon: Daemon) -> int:
    mover = daemon.pipeline.mover
    return mover.rmap.extents if isinstance(mover, PidMover) else 0


def _loop(daemon: MeasuredDaemon, seconds: float, touch: Callable[[], None]
          ) -> dict[str, object]:
    """Start the daemon, run it `seconds` past its second idle round, close it: the figures."""
    clock, tally, interval = daemon.clock, daemon.tally, daemon.config.interval
    baseline = _kib("VmRSS")
    cpu0 = time.process_time()
    daemon.start()
    start_cpu = time.process_time() - cpu0
    if not any(isinstance(c, IdleFeed) for c in daemon.pipeline.collectors):
        raise SystemExit("measure: the idle collector is unusable here; its rounds time the run")
    started = clock.now()
    rss: list[int] = []
    steps = moved = 0
    cpu = 0.0  # the whole step's, stages and what runs between them
    # The steady hour starts once a first full round is in (two read-backs): the
    # start-up's one-off work (every page new, the map's first build) stays out of it.
    steady: tuple[float, float] | None = None  # (clock, cpu) at its start
    while steady is None or clock.now() - steady[0] < seconds:
        touch()
        step_started, step_cpu = clock.now(), time.process_time()
        moved += sum(daemon.step().moved.values())
        cpu += time.process_time() - step_cpu
        steps += 1
        rss.append(_kib("VmRSS"))
        clock.pause(interval - (clock.now() - step_started))
        if steady is None and len(tally.rounds_at) >= 2:
            steady = (clock.now(), cpu)
    wall = clock.now() - started
    steady_wall, steady_cpu = clock.now() - steady[0], cpu - steady[1]
    structures = _structures(daemon)
    extents = _extents(daemon)
    daemon.close()
    tally.peak_rss = max(tally.peak_rss, _kib("VmHWM"))
    rounds = np.diff(tally.rounds_at[1:])  # the first read-back comes after one interval
    return {
        "intervals": steps, "virtual_seconds": round(wall, 1),
        "rss_bytes": tally.peak_rss, "steady_rss_bytes": int(np.median(rss)),
        "baseline_rss_bytes": baseline,
        "structures_bytes": structures,
        "reverse_map_extents": extents,
        "stage_peak_over_start_bytes": {k: s.peak_over_start for k, s in tally.stages.items()},
        "start_cpu_seconds": round(start_cpu, 3),
        "cpu_seconds": round(cpu, 3),
        "cpu_fraction_of_core": round(cpu / wall, 5),
        "steady_seconds": round(steady_wall, 1),
        "steady_cpu_fraction_of_core": round(steady_cpu / steady_wall, 5),
        "stage_cpu_seconds_per_interval": {k: round(s.cpu_seconds / steps, 4)
                                           for k, s in tally.stages.items()},
        "stage_max_seconds": {k: round(s.max_wall_seconds, 3) for k, s in tally.stages.items()},
        "stage_max_cpu_seconds": {k: round(s.max_cpu_seconds, 3)
                                  for k, s in tally.stages.items()},
        "decide_seconds": round(tally.stages["policy"].max_wall_seconds, 3),
        "decide_cpu_seconds": round(tally.stages["policy"].max_cpu_seconds, 3),
        "seconds_per_full_round": {
            "idle": round(float(rounds.mean()), 1) if rounds.size else None},
        "idle_rounds": int(rounds.size),
        "moved_pages": tally.moved_pages or moved,
    }


def _measured(config: Config, root: HostRoot, clock: VirtualClock, tally: Tally,
              build: Builder = build_pipeline) -> MeasuredDaemon:
    daemon = MeasuredDaemon(config, root, build=build)
    daemon.clock, daemon.tally = clock, tally
    return daemon


def run(root: Path, seconds: float, mover: str) -> dict[str, object]:
    """On a fabricated host: virtual time, recorded moves, the harness's accesses."""
    shape = fabricated.read_shape(root)
    clock, tally, config = VirtualClock(), Tally(), scale_config()
    daemon = _measured(config, HostRoot(root), clock, tally, _builder(clock, tally, mover))
    row: dict[str, object] = {
        "host_gib": shape.gib, "mover": mover, "npfns": shape.npfns,
        "processes": shape.processes, "user_pages": shape.user_pages,
        "mapped_entries": shape.mapped_entries}
    row |= _loop(daemon, seconds, Accesses(root).touch)
    floor = 2 * shape.user_pages / config.collectors.idle.pfns_per_second
    row["seconds_per_full_round"]["idle_paced_floor"] = round(floor, 1)  # type: ignore[index]
    return row


def run_lab(seconds: float, mover: str) -> dict[str, object]:
    """On this (lab) kernel: real time, real moves; the accesses are the workload's."""
    config = scale_config(mover)
    daemon = _measured(config, HOST, RealClock(), Tally())
    row: dict[str, object] = {"lab": True, "mover": mover, "kernel": os.uname().release}
    row |= _loop(daemon, seconds, lambda: None)
    facts = node_facts(daemon.topology)  # as the last interval read it
    row["npfns"] = sum(e - s for f in facts for s, e in f.ranges)
    row["host_gib"] = round(sum(f.managed_pages for f in facts) * PAGE_KIB / 2**20, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the fabricated host ('/' with --lab)")
    parser.add_argument("--lab", action="store_true",
                        help="this kernel's own files, real time, real moves")
    parser.add_argument("--seconds", type=float, default=3600.0,
                        help="virtual seconds of intervals to run after the first round")
    parser.add_argument("--mover", choices=("pid", "phys"), default="pid",
                        help="pid: the PID mover and its reverse map (move_pages recorded); "
                             "phys: a recording mover without a page map (with --lab: "
                             "the real movers)")
    args = parser.parse_args()
    row = run_lab(args.seconds, args.mover) if args.lab else run(args.root, args.seconds,
                                                                  args.mover)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
