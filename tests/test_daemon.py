"""The daemon: its observable state, the interval loop, `tierd run` and `tierd simulate`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from lab.workload import Placement, Workload
from tierd import cli
from tierd.collectors import perf
from tierd.collectors.collector import Pace
from tierd.collectors.evidence import Evidence, IdleScan, RegionBatch, SampleBatch
from tierd.collectors.idle import IdleFeed
from tierd.collectors.topology import node_facts, read_topology
from tierd.commands.run import summary_line
from tierd.config import Config, parse
from tierd.daemon import Daemon, IntervalSummary, describe
from tierd.errors import TierdError
from tierd.heat import PINNED, classes
from tierd.kernel import kpageflags as kpf
from tierd.kernel import pagemap
from tierd.kernel.numa import move_pages
from tierd.kernel.page_idle import BITMAP
from tierd.kernel.root import HostRoot
from tierd.movers.batches import BatchResult, MoverParams
from tierd.movers.mover import MaplessMover
from tierd.pipeline import Pipeline, Settings, build_pipeline
from tierd.policy import Plan, PolicyParams
from tierd.telemetry import STAGES, DaemonState
from tierd.trace import IntervalRecord, TraceError, TraceWriter, read_trace
from tierd.vocabulary import Batch, Direction, Health, NodeFacts, State


def test_moves_count_pages_and_bytes_per_direction_and_node_pair() -> None:
    state = DaemonState(page_size=4096)
    state.record_moved(Direction.DEMOTE, 0, 1, 10)
    state.record_moved(Direction.DEMOTE, 0, 1, 5)
    state.record_moved(Direction.PROMOTE, 1, 0, 2)
    snap = state.snapshot()
    assert snap.pages_moved[(Direction.DEMOTE, 0, 1)] == 15
    assert snap.bytes_moved[(Direction.DEMOTE, 0, 1)] == 15 * 4096
    assert snap.pages_moved[(Direction.PROMOTE, 1, 0)] == 2
    assert not snap.pages_would_move


def test_dry_run_counts_what_would_move_and_nothing_as_moved() -> None:
    state = DaemonState(dry_run=True)
    state.record_moved(Direction.DEMOTE, 0, 1, 7)
    snap = state.snapshot()
    assert snap.pages_would_move[(Direction.DEMOTE, 0, 1)] == 7
    assert not snap.pages_moved and not snap.bytes_moved


def test_snapshot_is_a_copy_later_updates_do_not_leak_in() -> None:
    state = DaemonState()
    state.record_failures({"EBUSY": 3})
    state.set_collector("idle", Health(State.DEGRADED, "page_idle missing"))
    state.record_duration("policy", 0.5)
    snap = state.snapshot()
    state.record_failures({"EBUSY": 1})
    state.set_collector("idle", Health())
    state.record_duration("policy", 0.25)
    assert snap.failures["EBUSY"] == 3
    assert snap.collectors["idle"].state is State.DEGRADED
    assert snap.durations["policy"].total_seconds == 0.5
    assert state.snapshot().durations["policy"].count == 2


def test_last_errors_are_bounded() -> None:
    state = DaemonState()
    for i in range(100):
        state.record_error("mover:pid", f"error {i}")
    errors = state.snapshot().last_errors
    assert len(errors) == 20 and errors[-1].message == "error 99"



def test_settings_follow_the_config() -> None:
    config = parse(b"interval: 4\npolicy: {heat_decay: 0.75, hysteresis_intervals: 3, "
                   b"budget_split: {promote: 0.25, demote: 0.75}}\n"
                   b"movers: {rate_mb_per_s: 10, batch_pages: 64}\n"
                   b"exclusions: {comms: ['db*'], pids: [7]}\n")
    settings = Settings.from_config(config, dry_run=True)
    assert settings.dry_run and settings.interval == 4
    assert settings.heat.decay == 0.75 and settings.heat.cooldown_rounds == 4
    assert settings.policy.hysteresis_rounds == 3 and settings.policy.promote_share == 0.25
    assert settings.mover.batch_pages == 64
    assert settings.exclusions.comms == ("db*",) and settings.exclusions.pids == (7,)
    assert settings.budget_pages(4096) == 10 * 4 * 256


def test_default_config_runs_the_movers_and_policys_own_defaults() -> None:
    # The config and the core each state a default (the core must not import the
    # config); the benchmarks measure the core's, so the two must not drift apart.
    settings = Settings.from_config(Config())
    assert settings.mover == MoverParams()
    assert settings.policy == PolicyParams()


class _FakeScanner:
    """An idle scanner that counts its scans (one mark + collect each)."""

    health = Health()

    def __init__(self) -> None:
        self.collected = 0
        self.marked = 0

    def collect(self) -> list[IdleScan]:
        self.collected += 1
        return [IdleScan(0, np.zeros(4, dtype=np.uint8), 0.0)]

    def mark(self) -> None:
        self.marked += 1


def test_a_round_ends_only_when_the_idle_scan_is_due() -> None:
    assert Evidence().new_round  # no idle collector: every interval is a round
    now = [100.0]
    scanner = _FakeScanner()
    feed = IdleFeed(scanner, 5.0, 10.0, clock=lambda: now[0])  # type: ignore[arg-type]
    assert scanner.marked == 1  # the first scan starts at once, due after one interval
    now[0] = 105.0 - 5.0 * 0.6
    evidence = feed.collect(5.0)
    assert not evidence.new_round and not evidence.idle and scanner.collected == 0
    # Due within half an interval: this boundary is the nearest one.
    now[0] = 105.0 - 5.0 * 0.4
    evidence = feed.collect(5.0)
    assert evidence.new_round and evidence.idle and scanner.collected == 1
    assert scanner.marked == 2
    now[0] += 10.0 - 5.0 * 0.6  # the next scan is due one scan interval later
    assert not feed.collect(5.0).new_round


def test_run_steps_every_interval_counting_the_steps_own_time() -> None:
    daemon = Daemon(parse(b"interval: 2\n"))
    waits: list[float] = []

    def step() -> IntervalSummary:
        time.sleep(0.3)
        return IntervalSummary()

    daemon.step = step  # type: ignore[method-assign]
    daemon.run(wait=lambda seconds: waits.append(seconds) or len(waits) > 2)
    assert waits[0] == 2.0
    assert all(1.6 <= w <= 1.71 for w in waits[1:]), waits


# --- one whole step on a fixture tree ---------------------------------------------------

IDLE_FIXTURE = Path(__file__).parent / "fixtures" / "idle" / "two-node"
MAX_PFN = 4096  # node 0 is PFNs [100, 1100), tier 0; node 1 is [2048, 3072), tier 1
KEEP_FREE = 16  # the fixture's promo watermark; the tests' headroom is 0
COLD_ON_FAST = np.arange(200, 400, dtype=np.uint64)
HOT_ON_SLOW = np.arange(2100, 2150, dtype=np.uint64)
USER_PAGE = (1 << kpf.KPF_LRU) | (1 << kpf.KPF_ANON) | (1 << kpf.KPF_MMAP)


class RecordingMover(MaplessMover):
    """A Mover that moves nothing and records what it was asked (every page 'moved')."""

    name = "recording"

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.refreshes = 0

    def refresh(self) -> list[str]:
        self.refreshes += 1
        return []

    def move(self, batch: Batch, flags: npt.NDArray[np.uint64] | None = None) -> BatchResult:
        self.batches.append(batch)
        result = BatchResult()
        result.succeed(batch.pfns)
        return result


class _FixtureHost:
    """The idle fixture tree with user pages on both nodes and an idle bitmap to touch."""

    def __init__(self, tmp_path: Path, node0_free: int = 400) -> None:
        self.root = tmp_path / "root"
        shutil.copytree(IDLE_FIXTURE, self.root)
        zoneinfo = self.root / "proc" / "zoneinfo"
        zoneinfo.write_text(zoneinfo.read_text().replace("400", str(node0_free), 2))
        flags = np.zeros(MAX_PFN, dtype=np.uint64)
        flags[COLD_ON_FAST] = flags[HOT_ON_SLOW] = USER_PAGE
        self._write(kpf.KPAGEFLAGS, flags)
        self._write(kpf.KPAGECOUNT, (flags != 0).astype(np.uint64))
        self.bitmap = self.root / BITMAP.lstrip("/")
        self.bitmap.parent.mkdir(parents=True)
        self.bitmap.write_bytes(bytes(MAX_PFN // 8))
        self.mover = RecordingMover()

    def _write(self, kernel_path: str, values: npt.NDArray[np.uint64]) -> None:
        path = self.root / kernel_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(values.tobytes())

    def touch(self, pfns: npt.NDArray[np.uint64]) -> None:
        """The pages were accessed since the last mark: their idle bits clear."""
        bits = np.unpackbits(np.frombuffer(self.bitmap.read_bytes(), dtype=np.uint8),
                             bitorder="little")
        bits[pfns.astype(np.intp)] = 0
        self.bitmap.write_bytes(np.packbits(bits, bitorder="little").tobytes())

    def run(self, daemon: Daemon, steps: int) -> None:
        """Start the daemon and step it `steps` times, the hot pages touched before each."""
        daemon.start()
        try:
            for _ in range(steps):
                self.touch(HOT_ON_SLOW)
                daemon.step()
        finally:
            daemon.close()

    def asked(self, direction: Direction) -> set[int]:
        """Every PFN the mover was asked to move in `direction`."""
        return {pfn for b in self.mover.batches if b.direction is direction
                for pfn in b.pfns.tolist()}

    def build(self, config: Config, root: HostRoot, _pace: Pace) -> Pipeline:
        return replace(build_pipeline(config, root), mover=self.mover)

    def daemon(self, policy: bytes = b"{hysteresis_intervals: 1, headroom_percent: 0,"
                                      b" demote_cold: true}") -> Daemon:
        # interval 2 s, scans due every 1 s: every step reads a scan back, without waiting;
        # demote_cold, so that the idle pages go down though node 0 has room.
        config = parse(b"interval: 2\nkernel_tiering: coexist\n"
                       b"collectors: {idle: {interval: 1}, perf: {enabled: false}}\n"
                       b"policy: " + policy + b"\n")
        return Daemon(config, HostRoot(self.root), build=self.build)


def test_a_whole_step_collects_decides_moves_and_publishes(tmp_path: Path) -> None:
    host = _FixtureHost(tmp_path)
    daemon = host.daemon()
    # Even: a page moved in one step is found anew in the next and sits out its cooldown
    # there, so after an even number of steps every page is tracked.
    steps = 4
    host.run(daemon, steps)
    # Collected and decided: the pages touched every round went up, the idle ones down
    # (the recording mover leaves them in place, so the next scans may find them again).
    asked: dict[tuple[Direction, int, int], list[int]] = {}
    for b in host.mover.batches:
        asked.setdefault((b.direction, b.source, b.target), []).extend(b.pfns.tolist())
    assert set(asked) == {(Direction.PROMOTE, 1, 0), (Direction.DEMOTE, 0, 1)}
    assert sorted(set(asked[(Direction.PROMOTE, 1, 0)])) == HOT_ON_SLOW.tolist()
    assert sorted(set(asked[(Direction.DEMOTE, 0, 1)])) == COLD_ON_FAST.tolist()
    assert host.mover.refreshes == steps
    # Published: every interval counted, the moves, the nodes and the collector's health.
    snap = daemon.state.snapshot()
    assert snap.intervals == steps and snap.mover == "recording"
    assert {k: v for k, v in snap.pages_moved.items() if v} == {
        key: len(pfns) for key, pfns in asked.items()}
    assert sorted(snap.nodes) == [0, 1] and snap.collectors["idle"].state is State.OK
    assert all(snap.durations[stage].count == steps for stage in STAGES)
    assert snap.durations["heat"].cpu_seconds > 0  # folding a scan in is no sleep
    assert snap.tracked_pages == COLD_ON_FAST.size + HOT_ON_SLOW.size


class MappedMover(RecordingMover):
    """A recording mover whose page map holds only `mapped` (as the PID mover's reverse
    map holds no page cache)."""

    def __init__(self, mapped: npt.NDArray[np.uint64]) -> None:
        super().__init__()
        self.mapped = mapped

    def reachable(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_] | None:
        return np.isin(pfns, self.mapped)


def test_hot_frames_the_movers_map_cannot_reach_are_never_planned(tmp_path: Path) -> None:
    """Else the policy plans them in vain and keeps the fast node's headroom for them."""
    host = _FixtureHost(tmp_path)
    host.mover = MappedMover(HOT_ON_SLOW[:20])
    host.run(host.daemon(), steps=5)
    assert host.asked(Direction.PROMOTE) == set(HOT_ON_SLOW[:20].tolist())


def test_cold_frames_the_mover_cannot_reach_are_pinned_not_sent(tmp_path: Path) -> None:
    """Else an exchange's cold half fails (page cache the PID mover cannot reach), frees
    no room, and the same frames are picked again once the next scan finds them."""
    host = _FixtureHost(tmp_path)
    host.mover = MappedMover(np.concatenate((COLD_ON_FAST[100:], HOT_ON_SLOW)))
    daemon = host.daemon()
    host.run(daemon, steps=6)
    assert host.asked(Direction.DEMOTE) == set(COLD_ON_FAST[100:].tolist())
    assert daemon.state.snapshot().pages_excluded["unreachable"] == 100
    assert (daemon.heat.mark[COLD_ON_FAST[:100].astype(np.intp)] == PINNED).all()


def test_pages_hot_in_the_first_round_take_free_room_in_the_first_step(
        tmp_path: Path) -> None:
    """At start-up no page is new: the first round's evidence moves hot pages into free
    room at once, though the shipped hysteresis holds every exchange for a second round."""
    host = _FixtureHost(tmp_path, node0_free=KEEP_FREE + 400)
    host.run(host.daemon(b"{hysteresis_intervals: 2, headroom_percent: 0}"), steps=1)
    assert [(b.direction, b.source, b.target) for b in host.mover.batches] == [
        (Direction.PROMOTE, 1, 0)]
    assert host.mover.batches[0].pfns.tolist() == HOT_ON_SLOW.tolist()


def _batch(direction: Direction, source: int, target: int, pages: int) -> Batch:
    return Batch(direction, source, target, np.arange(pages, dtype=np.uint64))


def test_promotions_take_the_room_the_kernel_reports_after_the_demotions(
        tmp_path: Path) -> None:
    host = _FixtureHost(tmp_path, node0_free=KEEP_FREE + 150)
    daemon = host.daemon()
    daemon.start()
    daemon.decide(node_facts(daemon.topology))
    plan = Plan((_batch(Direction.DEMOTE, 0, 1, 300), _batch(Direction.PROMOTE, 1, 0, 100),
                 _batch(Direction.PROMOTE, 2, 0, 100), _batch(Direction.PROMOTE, 3, 0, 100)))
    summary = daemon.move(plan)
    # One read of the room, after the demotions; the third batch finds none left.
    assert [(b.direction, b.pfns.size) for b in host.mover.batches] == [
        (Direction.DEMOTE, 300), (Direction.PROMOTE, 100), (Direction.PROMOTE, 50)]
    assert dict(summary.failures) == {"no_room": 150}
    daemon.close()


def test_promotions_below_the_headroom_take_the_room_above_the_plans_floor(
        tmp_path: Path) -> None:
    host = _FixtureHost(tmp_path, node0_free=KEEP_FREE - 4)
    daemon = host.daemon()
    daemon.start()
    daemon.decide(node_facts(daemon.topology))
    promote = _batch(Direction.PROMOTE, 1, 0, 100)
    summary = daemon.move(Plan((promote,), promotion_floor={0: KEEP_FREE - 10}))
    assert [b.pfns.size for b in host.mover.batches] == [6]
    assert dict(summary.failures) == {"no_room": 94}
    daemon.move(Plan((promote,)))  # no floor: keep_free, and no room above it
    assert [b.pfns.size for b in host.mover.batches] == [6]
    daemon.close()


def test_node_usage_reports_the_policy_floor_and_placement_by_heat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What tierd_placement_bytes and keep_free are built from: per node, its own PFNs."""
    from tierd.heat import COLD, HOT, WARM, HeatModel, _pack

    daemon = Daemon(Config())
    monkeypatch.setattr(Daemon, "heat", HeatModel(2000))
    daemon.heat.mark[0:100] = _pack(HOT, 0, 0)
    daemon.heat.mark[100:400] = _pack(COLD, 0, 0)
    daemon.heat.mark[1000:1010] = _pack(HOT, 0, 0)
    daemon.heat.mark[1010:1060] = _pack(WARM, 0, 0)
    daemon._keep_free = {0: 64, 1: 32}
    fast = NodeFacts(node=0, tier=0, ranges=((0, 1000),), managed_pages=1000, free_pages=70,
                     watermark_pages=40)
    slow = NodeFacts(node=1, tier=1, ranges=((1000, 1500), (1800, 2000)), managed_pages=700,
                     free_pages=500, watermark_pages=20)
    page = pagemap.PAGE_SIZE
    first, second = daemon._usage(fast, 4), daemon._usage(slow, 54)
    assert (first.tier, first.tier_rank, first.keep_free_bytes) == (4, 0, 64 * page)
    assert (first.hot_bytes, first.warm_bytes, first.cold_bytes) == (100 * page, 0, 300 * page)
    assert (second.tier, second.tier_rank) == (54, 1)
    assert (second.hot_bytes, second.warm_bytes, second.cold_bytes) == (10 * page, 50 * page, 0)


def test_node_usage_is_recounted_only_after_the_heat_model_changed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tierd.heat import COLD, HOT, HeatModel, _pack

    model = HeatModel(2000)
    monkeypatch.setattr(Daemon, "heat", model)
    passes = []
    counts = model.class_counts
    monkeypatch.setattr(model, "class_counts",
                        lambda start, end: passes.append(start) or counts(start, end))
    daemon = Daemon(Config())
    model.mark[0:100] = _pack(HOT, 0, 0)
    fast = NodeFacts(node=0, tier=0, ranges=((0, 1000),), managed_pages=1000, free_pages=70,
                     watermark_pages=40)
    assert daemon._usage(fast, 4).hot_bytes == 100 * pagemap.PAGE_SIZE
    assert daemon._usage(replace(fast, free_pages=60), 4).hot_bytes == 100 * pagemap.PAGE_SIZE
    assert len(passes) == 1  # nothing changed the model: no second pass
    model.mark[100:150] = _pack(COLD, 0, 0)
    model.pin(np.arange(50, dtype=np.uint64))
    assert daemon._usage(fast, 4).hot_bytes == 50 * pagemap.PAGE_SIZE
    assert daemon._usage(fast, 4).cold_bytes == 50 * pagemap.PAGE_SIZE
    assert len(passes) == 2


def test_heat_strip_is_the_mean_heat_of_equal_slices_across_a_nodes_ranges(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tierd.heat import HEAT_SCALE, HeatModel

    daemon = Daemon(Config())
    monkeypatch.setattr(Daemon, "heat", HeatModel(5000))
    daemon.heat.heat[:] = np.random.default_rng(7).integers(0, 256, 5000)
    ranges = ((100, 1000), (1800, 2013), (3000, 6000))  # the last one past the model's end
    node = NodeFacts(node=0, tier=0, ranges=ranges, managed_pages=4113, free_pages=0,
                     watermark_pages=0)
    joined = np.concatenate([daemon.heat.heat[s:min(e, 5000)] for s, e in ranges])
    edges = np.linspace(0, joined.size, 65).astype(np.intp)
    means = [joined[a:b].sum() / (b - a) / HEAT_SCALE for a, b in pairwise(edges)]
    assert daemon._strip(node) == pytest.approx(means)
    short = NodeFacts(node=1, tier=1, ranges=((0, 63),), managed_pages=63, free_pages=0,
                      watermark_pages=0)
    assert daemon._strip(short) == []


def test_interval_and_exit_summaries_name_pages_nodes_and_reasons_not_addresses() -> None:
    summary = IntervalSummary(moved=Counter({(Direction.PROMOTE, 1, 0): 256,
                                             (Direction.DEMOTE, 0, 1): 512}),
                              failures=Counter({"EBUSY": 2}), deferred=10)
    assert describe(summary, 4096) == ("demoted 512 pages (2.0 MiB) 0->1, promoted 256 pages "
                                       "(1.0 MiB) 1->0; 10 pages deferred by the rate limit; "
                                       "not moved: EBUSY=2")
    state = DaemonState(page_size=4096, mover="pid")
    state.record_moved(Direction.DEMOTE, 0, 1, 512)
    state.record_failures({"EBUSY": 2})
    state.finish_interval()
    assert summary_line(state.snapshot()) == (
        "tierd: 1 interval, mover pid, promoted 0 pages (0.0 MiB), demoted 512 pages "
        "(2.0 MiB), 2 not moved (EBUSY=2)")


def _record(npfns: int, hot: list[int]) -> IntervalRecord:
    ages = np.full(npfns, 3, dtype=np.uint8)
    ages[hot] = 0
    nodes = [NodeFacts(0, 0, ((0, npfns // 2),), 1000, 400, 10),
             NodeFacts(1, 1, ((npfns // 2, npfns),), 1000, 900, 10)]
    return IntervalRecord(npfns, 4096, 1.0, 1000, nodes,
                          idle=[IdleScan(0, ages, 0.0)],
                          samples=[SampleBatch(np.array(hot, dtype=np.uint64), 0, 0, 0.0)],
                          regions=[RegionBatch(np.array([0], dtype=np.uint64),
                                               np.array([4], dtype=np.uint64),
                                               np.array([3], dtype=np.uint32),
                                               np.array([1], dtype=np.uint32), 20, 0.0)])


def test_a_trace_reads_back_what_was_written(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "trace")
    writer.write(_record(64, [40, 41]))
    writer.close()
    assert (tmp_path / "trace").stat().st_mode & 0o777 == 0o600
    (record,) = list(read_trace(tmp_path / "trace"))
    assert record.nodes[1].ranges == ((32, 64),) and record.budget_pages == 1000
    assert record.idle[0].idle_age[40] == 0 and record.idle[0].idle_age[0] == 3
    assert record.samples[0].pfns.tolist() == [40, 41]
    assert record.regions[0].nr_accesses.tolist() == [3]


def test_a_broken_trace_names_the_file_and_entry(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="junk: not a tierd trace"):
        list(read_trace(tmp_path / "junk"))


def test_simulate_replays_a_trace_and_prints_what_would_move(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = TraceWriter(tmp_path / "trace")
    for _ in range(5):
        writer.write(_record(64, [40, 41, 42]))  # hot pages on the slow node
    writer.close()
    config = tmp_path / "policy.yaml"
    config.write_text("policy: {hysteresis_intervals: 1}\n")
    assert cli.main(["simulate", str(tmp_path / "trace"), "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    # One round of evidence is enough to take free room, even the first round (its pages
    # predate the replay); idle pages stay where the fast node has room for them.
    assert lines[0] == "interval 1: promote 1->0 3 pages (0.0 MiB)"
    assert lines[-1].startswith("total over 5 intervals: promote 1->0 ")
    assert "demote" not in lines[-1]



def test_run_with_a_bad_config_exits_78_naming_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tierd.yaml"
    config.write_text("interval: 5\nmovers: {rate_mb_per_s: -1}\n")
    assert cli.main(["run", "--once", "--config", str(config)]) == 78
    assert f"{config}:2: movers.rate_mb_per_s" in capsys.readouterr().err


def test_run_exits_78_when_the_host_cannot_honour_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """movers.kind: phys on a kernel without move_phys_pages: a restart cannot fix it."""
    if Path("/sys/kernel/mm/move_phys_pages/syscall_nr").exists():
        pytest.skip("this kernel has move_phys_pages")
    config = tmp_path / "tierd.yaml"
    config.write_text("movers: {kind: phys}\nmetrics: {enabled: false}\n")
    assert cli.main(["run", "--once", "--config", str(config)]) == 78
    assert "movers.kind is 'phys' but move_phys_pages is unusable" in capsys.readouterr().err


# --- the lab: the daemon against real kernels -----------------------------------------------

LAB = Path(__file__).parent / "lab"
INTERVAL = 2.0
HOT, COLD = "384M", "576M"
FAST_FREE_TARGET = 900 << 20  # left on node 0: H + C exceed it, either set fits


def _fast_full() -> int:
    """Bytes node 0 may have free and still be full: what the policy keeps free (its
    promo/high watermark plus the 2% headroom of _config) plus 5% of the node."""
    node = read_topology().nodes[0]
    keep = max(node.watermark_high, node.watermark_promo or 0)
    return (keep + node.managed_pages * 7 // 100) * 4096
EXCLUDED_COMM = "tierd-excl-hog"
EXCLUDED_CGROUP = "/tierd-test-excluded"

# A process holding `size` bytes on node 0 (optionally mlocked, renamed, in a cgroup) and
# printing its buffer address; it sleeps until killed. A locked buffer is THP-backed and
# then made read-only one page per 2 MiB: each THP is then mapped by PTEs, and kpageflags
# shows none of its pages as mlocked or unevictable, though the mapping is locked.
HOG = """
import ctypes, mmap, sys, time
import numpy as np
sys.path.insert(0, sys.argv[5])
from workload import set_preferred_node
size, lock, name, cgroup = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)
if cgroup:
    open(f"/sys/fs/cgroup{cgroup}/cgroup.procs", "w").write("0")
if name:
    libc.prctl(15, name.encode(), 0, 0, 0)  # PR_SET_NAME
set_preferred_node(0)
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf.madvise(mmap.MADV_HUGEPAGE)
a = np.frombuffer(buf, dtype=np.uint8)
a[::4096] = 7
if lock and libc.mlock(ctypes.c_void_p(a.ctypes.data), ctypes.c_size_t(size)) != 0:
    sys.exit(f"mlock: errno {ctypes.get_errno()}")
for offset in range(0, size if lock else 0, 2 << 20):
    libc.mprotect(ctypes.c_void_p(a.ctypes.data + offset), ctypes.c_size_t(4096), 1)
print(a.ctypes.data, flush=True)
time.sleep(3600)
"""


@dataclass
class Hog:
    proc: subprocess.Popen[str]
    addresses: np.ndarray

    @classmethod
    def start(cls, size: int, *, mlock: bool = False, name: str = "", cgroup: str = "") -> Hog:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOG, str(size), "1" if mlock else "0", name, cgroup,
             str(LAB)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"hog exited with {proc.wait()}"
        base = int(line)
        return cls(proc, base + 4096 * np.arange(size // 4096, dtype=np.uint64))

    def nodes(self) -> np.ndarray:
        return move_pages(self.proc.pid, self.addresses)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _node0_meminfo(key: str) -> int:
    for line in Path("/sys/devices/system/node/node0/meminfo").read_text().splitlines():
        if f" {key}:" in line:
            return int(line.split()[-2]) * 1024
    raise AssertionError(f"no {key} in node0/meminfo")


def _config(mover: str, policy: str = "{hysteresis_intervals: 1, headroom_percent: 2.0}"
            ) -> Config:
    lines = [
        f"interval: {INTERVAL}",
        f"policy: {policy}",
        f"movers: {{kind: {mover}, rate_mb_per_s: 400, batch_pages: 1024}}",
        f"collectors: {{idle: {{interval: {INTERVAL}, pfns_per_second: 100000000}},"
        " perf: {enabled: false}, damon: {aggregation_interval: 1.0}}",
        f"exclusions: {{comms: ['{EXCLUDED_COMM}'], cgroups: ['{EXCLUDED_CGROUP}']}}",
        "kernel_tiering: warn",
        "metrics: {enabled: false}",
    ]
    return parse("\n".join(lines).encode())


class Moves:
    """Per-page node history of the workload's two regions: how often each page moved."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.last = self._nodes()
        self.moves = np.zeros(self.last.size, dtype=np.int64)

    def _nodes(self) -> np.ndarray:
        state = self.workload.state()
        parts = []
        for name in ("a", "b"):
            region = state["regions"][name]
            addrs = region["address"] + 4096 * np.arange(region["pages"], dtype=np.uint64)
            parts.append(move_pages(self.workload.pid, addrs))
        return np.concatenate(parts)

    def update(self) -> None:
        now = self._nodes()
        self.moves += (now != self.last) & (now >= 0) & (self.last >= 0)
        self.last = now

    def reset(self) -> None:
        self.moves[:] = 0


def _placed(placement: Placement, start_node: int) -> bool:
    """H is on node 0, and no cold page moved without a reason.

    Cold pages leave node 0 only for the room H needs (the default policy): started
    on node 0, where H and C do not both fit, node 0 stays full. Started on node 1,
    C stays there: a page nobody reads is not worth the copy into free room.
    """
    if placement.hot_on_fast < 0.95:
        return False
    if start_node == 0:
        return _node0_meminfo("MemFree") <= _fast_full()
    return placement.cold_on_slow >= 0.95


def _converge(daemon: Daemon, workload: Workload, moves: Moves, start_node: int,
              limit: int = 10) -> int:
    """Step the daemon until the workload is placed (_placed); the steps it took."""
    for step in range(1, limit + 1):
        time.sleep(INTERVAL)
        summary = daemon.step()
        moves.update()
        placement = workload.placement()
        snap = daemon.state.snapshot()
        print(f"interval {step} (workload pass {workload.state()['passes']}): "
              f"H on node 0 {placement.hot_on_fast:.3f}, "
              f"C on node 1 {placement.cold_on_slow:.3f}, "
              f"node 0 free {_node0_meminfo('MemFree') >> 20} MiB; "
              f"{describe(summary, 4096)}; tracked "
              f"{snap.tracked_pages}, rmap {snap.rmap_pages}, excluded "
              f"{dict(snap.pages_excluded)}, collectors "
              f"{ {k: (v.state.value, v.reason) for k, v in snap.collectors.items()} }, "
              f"classes {np.bincount(classes(daemon.heat.mark), minlength=4).tolist()}",
              flush=True)
        if _placed(placement, start_node):
            return step
    raise AssertionError(f"not converged in {limit} intervals: {workload.placement()}")


def _protected_hogs(mlocked_size: int) -> list[Hog]:
    """Cold memory on node 0 tierd must never move: by name, by cgroup, mlocked."""
    Path("/sys/fs/cgroup" + EXCLUDED_CGROUP).mkdir(exist_ok=True)
    Path("/sys/fs/cgroup/cgroup.subtree_control").write_text("+memory")
    hogs = [Hog.start(64 << 20, name=EXCLUDED_COMM), Hog.start(64 << 20, cgroup=EXCLUDED_CGROUP)]
    hogs.append(Hog.start(mlocked_size, mlock=True))
    return hogs


def _scenario(lab_kernel: str, mover: str, start_node: int, swap: bool) -> None:
    hogs = _protected_hogs(max(64 << 20, _node0_meminfo("MemFree") - FAST_FREE_TARGET))
    before = [hog.nodes() for hog in hogs]
    assert all((b == 0).mean() > 0.9 for b in before), "hogs did not start on node 0"
    workload = Workload.start(HOT, COLD, start_node=start_node, state_dir=Path("/tmp"))
    daemon = Daemon(_config(mover))
    try:
        daemon.start()
        assert daemon.state.mover == ("pid" if mover == "pid" or lab_kernel == "stock"
                                      else "phys")
        moves = Moves(workload)
        _converge(daemon, workload, moves, start_node)
        if swap:
            moves.reset()
            workload.swap()
            _converge(daemon, workload, moves, start_node)
            assert moves.moves.max() <= 2, f"a page moved {moves.moves.max()} times"
        snap = daemon.state.snapshot()
        print(summary_line(snap), dict(snap.failures), dict(snap.pages_excluded), flush=True)
        for hog, nodes in zip(hogs, before, strict=True):
            assert np.array_equal(hog.nodes(), nodes), "a protected page moved"
    finally:
        daemon.close()
        intact = workload.stop()
        for hog in hogs:
            hog.stop()
    assert intact, "the workload's memory changed"


@pytest.mark.vm(kernels=["tierd"])
def test_phys_mover_sorts_hot_and_cold_and_again_after_a_swap(lab_kernel: str) -> None:
    _scenario(lab_kernel, "auto", start_node=0, swap=True)


@pytest.mark.vm(kernels=["tierd"])
def test_forced_pid_mover_sorts_hot_and_cold_and_again_after_a_swap(lab_kernel: str) -> None:
    _scenario(lab_kernel, "pid", start_node=0, swap=True)


@pytest.mark.vm
def test_starting_on_the_slow_node_hot_pages_come_up(lab_kernel: str) -> None:
    _scenario(lab_kernel, "auto", start_node=1, swap=False)


# On stock the evidence is DAMON's vaddr monitoring of the largest processes:
# paddr regions mixed hot and cold pages once they interleaved physically, and
# the cold set stalled near 90% on node 1 (docs/policy.md, "Known limits").
# This had failed once in a full run on a loaded host (newly hot pages
# promoted, then read cold and demoted again) while the workload did not drop
# its TLB between passes: under QEMU's TCG, touches after DAMON cleared the
# Accessed bits then set none (tests/lab/tlb.py). With drop_tlb() after every
# pass it passed 8 runs of 8 (2026-11-25: 3 alone, 5 after the other stock
# daemon tests); the failure itself was never reproduced, so the TLB as its
# cause is likely, not proven.
@pytest.mark.vm(kernels=["stock"])
def test_stock_kernel_pid_mover_with_damon_sorts_and_swaps(lab_kernel: str) -> None:
    _scenario(lab_kernel, "auto", start_node=0, swap=True)


@pytest.mark.vm
def test_protected_pages_never_move_even_when_they_are_the_coldest(lab_kernel: str) -> None:
    hogs = _protected_hogs(128 << 20)
    before = [hog.nodes() for hog in hogs]
    locked = np.sort(pagemap.pfns_of(hogs[-1].proc.pid, hogs[-1].addresses))
    with kpf.kpageflags() as flags_file:
        flags = flags_file.read_at(locked)
    # The gap this guards: the lock is in the mapping only, not in kpageflags (but for
    # the buffer's ends outside a 2 MiB-aligned THP).
    assert (~kpf.has_any(flags, kpf.KPF_MLOCKED, kpf.KPF_UNEVICTABLE)).mean() > 0.9
    # demote_cold: tierd demotes every cold page it may, room needed or not.
    daemon = Daemon(_config("auto", policy="{hysteresis_intervals: 1, demote_cold: true}"))
    try:
        daemon.start()
        for _ in range(6):
            time.sleep(INTERVAL)
            daemon.step()
        snap = daemon.state.snapshot()
        print(summary_line(snap), dict(snap.failures), dict(snap.pages_excluded), flush=True)
        for hog, nodes in zip(hogs, before, strict=True):
            assert (nodes == 0).all() and np.array_equal(hog.nodes(), nodes)
            # Not a candidate at all: untracked (not in the reverse map) or pinned.
            pfns = pagemap.pfns_of(hog.proc.pid, hog.addresses).astype(np.intp)
            assert (classes(daemon.heat.mark[pfns]) == 0).all()
        assert sum(n for (d, _, _), n in snap.pages_moved.items() if d is Direction.DEMOTE) > 0
        assert snap.pages_excluded["mlocked"] >= (128 << 20) // 4096
    finally:
        daemon.close()
        for hog in hogs:
            hog.stop()


@pytest.mark.vm
def test_tierd_run_once_dry_run_prints_a_summary_and_moves_nothing(tmp_path: Path) -> None:
    config = tmp_path / "tierd.yaml"
    config.write_text("interval: 1\nmetrics: {enabled: false}\ncollectors: {perf: "
                      "{enabled: false}, idle: {interval: 1}}\n")
    done = subprocess.run([sys.executable, "-m", "tierd", "run", "--once", "--dry-run",
                           "--config", str(config), "--record", str(tmp_path / "trace")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("tierd: 1 interval, mover ")
    assert "would have promoted" in done.stdout
    simulated = subprocess.run([sys.executable, "-m", "tierd", "simulate", str(tmp_path / "trace")],
                               capture_output=True, text=True, timeout=600)
    assert simulated.returncode == 0, simulated.stderr
    assert simulated.stdout.splitlines()[-1].startswith("total over 1 interval:")



def test_configured_perf_events_are_tried_in_order_and_named_when_none_works() -> None:
    root = HostRoot(Path(__file__).parent / "fixtures" / "perf" / "amd-zen4")
    event = perf.configured_event(root, ("no-such-pmu/event=1/", "ibs_op/cnt_ctl=1/pp"))
    assert event.pmu == "ibs_op" and event.precise_ip == 2
    with pytest.raises(TierdError, match=r"not-an-event.*expected pmu/term"):
        perf.configured_event(root, ("not-an-event",))
