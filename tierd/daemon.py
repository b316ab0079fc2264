"""The daemon loop: collectors -> heat -> policy -> mover, once per interval.

`start()` builds the pipeline (tierd.pipeline.build_pipeline: the topology,
the heat model, every usable collector, the mover). One interval is
`Daemon.step()`, which runs these stages in order, each its own method and
each timed into the state:

    collect   every collector's evidence for the interval (Collector.collect)
    heat      decay, fold the evidence in, reclassify
    rmap      the mover's upkeep (Mover.refresh: the PID mover's reverse map)
    policy    one decision pass over the node targets from the topology
    move      carry the plan out batch by batch (Mover.move; counted in dry-run)

and then publishes the interval into the state. `run(stop)` repeats step()
every `interval` seconds until `stop` is set; a stop during the move stage
lets the batch in flight finish. `reload(config)` queues a validated config;
the next step swaps it in before collecting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import numpy.typing as npt

from tierd import policy
from tierd.collectors.collector import Pace
from tierd.collectors.evidence import Evidence
from tierd.collectors.processes import ProcessFilter
from tierd.collectors.topology import Topology, node_facts, refresh_topology
from tierd.config import Config
from tierd.errors import Interrupted, KernelFileError
from tierd.heat import HEAT_SCALE, HOT, PASS_CHUNK, HeatModel, classes
from tierd.history import MoveHistory
from tierd.kernel.kernel_tiering import read_kernel_tiering
from tierd.kernel.root import HOST, HostRoot
from tierd.kernel.zoneinfo import read_zoneinfo
from tierd.movers import safety
from tierd.movers.batches import BatchResult
from tierd.movers.dry_run import WouldMoveLedger
from tierd.pipeline import Pipeline, Settings, build_pipeline
from tierd.policy import Plan, chunks
from tierd.telemetry import DaemonState, NodeUsage
from tierd.trace import IntervalRecord, TraceError, TraceWriter
from tierd.vocabulary import PAGE_SIZE, Batch, Direction, NodeFacts

__all__ = ["Daemon", "IntervalSummary", "Settings", "describe", "node_facts"]

log = logging.getLogger(__name__)
_V = TypeVar("_V")

HEAT_STRIP_BINS = 64
# Pinned frames (mlocked, unevictable, excluded) are reconsidered this often: their
# pages may have been unlocked, freed or their owner may have exited.
UNPIN_EVERY_INTERVALS = 30
# New pages checked for pinning at a time: bounds the check's temporaries.
PIN_CHECK_PAGES = 1 << 20
# Rounds a moved page is remembered: a move back within them is a ping-pong.
HISTORY_ROUNDS = 8

Builder = Callable[[Config, HostRoot, Pace], Pipeline]


@dataclass
class IntervalSummary:
    """What one interval did (page counts by (direction, source, target); no addresses)."""

    moved: Counter[tuple[Direction, int, int]] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    planned: int = 0
    deferred: int = 0


class Daemon:
    # Set by start(): the parts, the topology as last read, and the exclusions in force.
    pipeline: Pipeline
    topology: Topology
    _process_filter: ProcessFilter

    def __init__(self, config: Config, root: HostRoot = HOST, state: DaemonState | None = None,
                 dry_run: bool = False, record: Path | None = None,
                 build: Builder = build_pipeline) -> None:
        self.root = root
        self.config = config
        self._dry_run_flag = dry_run
        self.settings = Settings.from_config(config, dry_run)
        self.state = state or DaemonState(page_size=PAGE_SIZE)
        self.state.dry_run = self.settings.dry_run
        self.stop_event = threading.Event()
        # Called between chunks of long work (scans, move batches): `tierd run` feeds
        # systemd's watchdog with it.
        self.heartbeat: Callable[[], object] = lambda: None
        self._stage_name = "start"
        self._pending: Config | None = None
        self._reload_lock = threading.Lock()
        self._record_path = record
        self._build = build
        self._resources = ExitStack()  # the pipeline and the trace: closed by close()
        self._trace: TraceWriter | None = None
        self._memcg_inodes: frozenset[int] = frozenset()
        self._protected = safety.Protected()
        self._new_round = False  # this interval's evidence started a round
        self._keep_free: dict[int, int] = {}  # node -> pages the policy keeps free
        self._would_move = WouldMoveLedger()
        self.history = MoveHistory(HISTORY_ROUNDS)
        self._views: dict[Hashable, tuple[int, object]] = {}  # key -> (heat version, view)

    @property
    def heat(self) -> HeatModel:
        return self.pipeline.heat

    # --- start and stop ------------------------------------------------------------

    def start(self) -> None:
        """Check the kernel's own tiering, then build the pipeline."""
        tiering = read_kernel_tiering(self.root)
        self.state.kernel_tiering = safety.check_kernel_tiering(tiering,
                                                                self.settings.kernel_tiering)
        self.pipeline = self._build(self.config, self.root, Pace(self._pause, self.checkpoint))
        self._resources.callback(self.pipeline.close)
        self.topology = self.pipeline.topology
        self._process_filter = self.pipeline.process_filter
        for name, health in self.pipeline.unusable.items():
            self.state.set_collector(name, health)
        for collector in self.pipeline.collectors:
            self.state.set_collector(collector.name, collector.health)
        self.state.mover = self.pipeline.mover.name
        self._memcg_inodes = safety.excluded_memcg_inodes(self.settings.exclusions, self.root)
        if self._record_path:
            try:
                self._trace = TraceWriter(self._record_path)
            except TraceError as e:
                self._stop_recording(e)
            self._resources.callback(self._close_trace)
        facts = node_facts(self.topology)
        log.info("tierd started: %d nodes in %d tiers, mover %s, %s, interval %.1fs, "
                 "budget %.0f MiB/s", len(facts), len({f.tier for f in facts}), self.state.mover,
                 "DRY RUN" if self.settings.dry_run else "moving pages", self.settings.interval,
                 self.settings.rate_mb_per_s)

    def close(self) -> None:
        self._resources.close()

    def checkpoint(self) -> None:
        """Between chunks of long work: feed the watchdog; raise Interrupted when stopping."""
        self.heartbeat()
        if self.stop_event.is_set():
            raise Interrupted("stopping")

    def _pause(self, seconds: float) -> None:
        """A pacing sleep that a stop cuts short, feeding the watchdog meanwhile."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.stop_event.wait(min(left, 1.0)):
                raise Interrupted("stopping")
            self.heartbeat()

    # --- reload -------------------------------------------------------------------------

    def reload(self, config: Config) -> None:
        """Queue an already validated config; the next interval starts with it."""
        with self._reload_lock:
            self._pending = config

    def _apply_pending(self) -> None:
        with self._reload_lock:
            config, self._pending = self._pending, None
        if config is None:
            return
        self.config = config
        self.settings = Settings.from_config(config, self._dry_run_flag)
        self.state.dry_run = self.settings.dry_run
        self.heat.set_params(self.settings.heat)
        self._process_filter = ProcessFilter(self.settings.exclusions, self.root)
        self.pipeline.mover.configure(self.settings.mover, self._process_filter)
        self._memcg_inodes = safety.excluded_memcg_inodes(self.settings.exclusions, self.root)
        log.info("config reloaded")

    # --- the loop -------------------------------------------------------------------------

    def run(self, once: bool = False,
            on_interval: Callable[[IntervalSummary], None] | None = None,
            wait: Callable[[float], bool] | None = None) -> None:
        """Step every interval until stop_event is set (or once).

        `wait(seconds)` replaces stop_event.wait: `tierd run` passes one that feeds
        systemd's watchdog while it waits (tierd.service.systemd.Notifier.wait).
        """
        wait = wait or self.stop_event.wait
        took = 0.0
        # One step every `interval` seconds: the step's own time (a paced scan, a large
        # move) counts against the wait, or every interval would stretch by it.
        while not wait(max(0.0, self.settings.interval - took)):
            started = time.monotonic()
            try:
                summary = self.step()
            except Interrupted:
                break
            except Exception as e:  # the interval's error boundary: the next one runs
                summary = self._failed(e)
            took = time.monotonic() - started
            if on_interval is not None:
                on_interval(summary)
            if once:
                break

    def _failed(self, error: Exception) -> IntervalSummary:
        """Log and count an interval cut short; health shows it until one completes."""
        message = " ".join(f"{type(error).__name__}: {error}".split())
        self.state.record_stage_failure(self._stage_name, message)
        log.error("interval failed in stage %s, the next one will run: %s", self._stage_name,
                  message[:500])
        log.debug("interval failure", exc_info=error)
        return IntervalSummary()

    @contextmanager
    def _stage(self, name: str, timed: bool = True) -> Iterator[None]:
        self._stage_name = name
        # CPU apart from wall time: a paced scan or a busy-page backoff sleeps.
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            if timed:
                self.state.record_duration(name, time.perf_counter() - started,
                                           time.thread_time() - started_cpu)

    def step(self) -> IntervalSummary:
        """One interval: collect, heat, rmap, policy, move, publish."""
        with self._stage("reload", timed=False):
            self._apply_pending()
        if self.state.intervals % UNPIN_EVERY_INTERVALS == UNPIN_EVERY_INTERVALS - 1:
            self.heat.unpin_all()
        with self._stage("collect"):
            self.topology = refresh_topology(self.topology, self.root)
            evidence = self.collect()
        with self._stage("heat"):
            self.update_heat(evidence)
        with self._stage("rmap"):
            self.refresh_mover()
        facts = node_facts(self.topology)
        with self._stage("policy"):
            plan = self.decide(facts)
        with self._stage("record", timed=False):
            self._record(facts, evidence)
        with self._stage("move"):
            summary = self.move(plan)
        with self._stage("publish", timed=False):
            self.publish(facts, summary)
        return summary

    def collect(self) -> Evidence:
        evidence = Evidence()
        for collector in self.pipeline.collectors:
            evidence.add(collector.collect(self.settings.interval))
            self.state.set_collector(collector.name, collector.health)
        for batch in evidence.samples:
            self.state.record_samples(int(batch.pfns.size), batch.lost, batch.unresolved)
        return evidence

    def update_heat(self, evidence: Evidence) -> None:
        self._protected = safety.protected_pfns(self._process_filter, self.root)
        for error in self._protected.errors:
            self.state.record_error("safety", error)
        self._new_round = evidence.new_round
        if evidence.new_round:
            self.history.advance()
        self.heat.fold(evidence.idle, evidence.samples, evidence.regions,
                       new_round=evidence.new_round, on_new=self._pin_unmovable)

    def _pin_unmovable(self, new: npt.NDArray[np.uint64]) -> None:
        """Pin newly tracked frames a mover must never touch, before the policy sees them."""
        pfns = np.unique(new)
        # By chunk: the first scan of a large host finds every user page new, and the
        # check's flags and reasons cost 16 bytes a page.
        for start in range(0, pfns.size, PIN_CHECK_PAGES):
            part = pfns[start:start + PIN_CHECK_PAGES]
            movable, _, dropped = safety.drop_pinned(part, self.root, self._memcg_inodes,
                                                     self._protected)
            for reason, count in dropped.items():
                self.state.record_excluded(reason, count)
            self.heat.pin(np.setdiff1d(part, movable, assume_unique=True))

    def refresh_mover(self) -> None:
        mover = self.pipeline.mover
        errors = mover.refresh()
        for error in errors[:3]:
            self.state.record_error("rmap", error)
        self.state.count_errors("rmap", max(0, len(errors) - 3))
        if any(c.tracks_all_pages for c in self.pipeline.collectors):
            return
        # No collector finds every user page: the mover's own list says which PFNs are.
        known = mover.known_pfns()
        if known is not None:
            self._pin_unmovable(self.heat.track(known))

    def decide(self, facts: list[NodeFacts]) -> Plan:
        if self._new_round:  # cooldowns last rounds: once a round keeps them, a pass apiece
            self._cool_unreachable_hot(facts)
        targets = policy.targets(facts, self.settings.headroom_percent)
        self._keep_free = {t.node: t.keep_free_pages for t in targets}
        plan = policy.decide(self.heat.heat, self.heat.mark, targets,
                             self.settings.budget_pages(), self.settings.policy)
        self.state.record_rate_limited(plan.deferred_pages)
        return plan

    def _cool_unreachable_hot(self, facts: list[NodeFacts]) -> None:
        """Cool down hot frames below the top tier that the mover's page map cannot move
        (page cache no process maps, for the PID mover): the policy would plan them in
        vain and keep the fast node's headroom for them, demoting pages it can reach.
        A cooldown, not a pin: a frame the next refresh maps is a candidate again."""
        mover = self.pipeline.mover
        if not facts or mover.reachable(np.zeros(0, dtype=np.uint64)) is None:
            return  # no page map: the mover reaches any page
        top = min(f.tier for f in facts)
        mark = self.heat.mark
        for f in (f for f in facts if f.tier != top):
            for low, high in chunks(f.ranges, mark.size, PASS_CHUNK):
                hot = (np.flatnonzero(classes(mark[low:high]) == HOT) + low).astype(np.uint64)
                reach = mover.reachable(hot) if hot.size else None
                if reach is not None and not reach.all():
                    self.heat.cool_down(hot[~reach])

    def move(self, plan: Plan) -> IntervalSummary:
        summary = IntervalSummary(planned=plan.pages(), deferred=plan.deferred_pages)
        full: set[int] = set()
        # Promotions come after every demotion and take the room the kernel reports
        # then: a failed demotion the node did not need costs no promotion.
        room: dict[int, int] | None = None
        for index, batch in enumerate(plan.batches):
            self.heartbeat()
            if self.stop_event.is_set():
                log.info("stopping: %d batches of this interval not started",
                         len(plan.batches) - index)
                break
            if batch.target in full:
                summary.failures["target_full"] += batch.pfns.size
                continue
            if batch.direction is Direction.PROMOTE and not self.settings.dry_run:
                room = self._room_now(plan.promotion_floor) if room is None else room
                batch = self._trim(batch, room, summary)
                if not batch.pfns.size:
                    continue
            result = self._move_batch(batch, summary)
            if result is not None and result.target_full:
                full.add(batch.target)
        self.state.record_failures(summary.failures)
        return summary

    def _room_now(self, floor: dict[int, int]) -> dict[int, int]:
        """Free pages above the promotions' floor per node (keep_free unless the plan says
        less), as the kernel counts them now ({} if unknown)."""
        try:
            zones = read_zoneinfo(self.root)
        except KernelFileError as e:
            self.state.record_error("topology", str(e))
            return {}
        return {node: sum(z.free for z in zones.of_node(node)) - floor.get(node, keep)
                for node, keep in self._keep_free.items()}

    @staticmethod
    def _trim(batch: Batch, room: dict[int, int], summary: IntervalSummary) -> Batch:
        """The batch cut to the target's room (no cooldown: the pages are retried next time)."""
        left = room.get(batch.target)
        if left is None:
            return batch
        keep = min(batch.pfns.size, max(0, left))
        room[batch.target] = left - keep
        if keep < batch.pfns.size:
            summary.failures["no_room"] += batch.pfns.size - keep
        return Batch(batch.direction, batch.source, batch.target, batch.pfns[:keep])

    def _move_batch(self, batch: Batch, summary: IntervalSummary) -> BatchResult | None:
        pfns, flags, dropped = safety.drop_pinned(batch.pfns, self.root, self._memcg_inodes,
                                                  self._protected)
        for reason, count in dropped.items():
            self.state.record_excluded(reason, count)
        self.heat.pin(np.setdiff1d(batch.pfns, pfns, assume_unique=True))
        pfns, flags = self._reachable(pfns, flags)
        key = (batch.direction, batch.source, batch.target)
        if self.settings.dry_run:
            # Pages never move in a dry run, so they are picked again after each
            # cooldown: the metric counts each decision once.
            self.state.record_moved(*key, self._would_move.record(pfns, batch.target))
            summary.moved[key] += int(pfns.size)
            self.heat.cool_down(pfns)  # as if moved: do not plan them again at once
            log.debug("dry run: would %s %d pages node %d -> %d", batch.direction.value,
                      pfns.size, batch.source, batch.target)
            return None
        self.state.record_attempted(*key, int(pfns.size))
        self.state.record_pingpong(batch.direction,
                                   self.history.reversals(pfns, batch.direction))
        result = self.pipeline.mover.move(Batch(batch.direction, batch.source, batch.target, pfns),
                                 flags)
        self.state.record_moved(*key, int(result.moved.size))
        summary.moved[key] += int(result.moved.size)
        summary.failures.update(result.failures)
        known = result.new_pfns != 0
        self.heat.transfer(result.moved[known], result.new_pfns[known])
        self.history.forget(result.moved)
        self.history.record(result.new_pfns[known], batch.direction)
        self.heat.vacate(result.moved[~known])
        # A frame whose page vanished or is not where tierd thought: forget it (the next
        # scan or refresh finds what lives there now) instead of retrying it forever.
        self.heat.vacate(result.stale)
        self.heat.cool_down(np.setdiff1d(result.not_moved, result.stale))
        return result

    def _reachable(self, pfns: npt.NDArray[np.uint64], flags: npt.NDArray[np.uint64]
                   ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
        """The pages the mover can reach; the rest are pinned like unmovable frames. An
        exchange whose cold half the PID mover cannot reach (page cache no process maps)
        frees no room, and a frame forgotten instead would be picked again once the next
        scan finds it."""
        reach = self.pipeline.mover.reachable(pfns)
        if reach is None or reach.all():
            return pfns, flags
        self.heat.pin(pfns[~reach])
        self.state.record_excluded("unreachable", int(np.count_nonzero(~reach)))
        return pfns[reach], flags[reach]

    # --- outputs ----------------------------------------------------------------------

    def _record(self, facts: list[NodeFacts], evidence: Evidence) -> None:
        if self._trace is None:
            return
        try:
            self._trace.write(IntervalRecord(
                npfns=self.heat.npfns, page_size=PAGE_SIZE,
                interval_seconds=self.settings.interval,
                budget_pages=self.settings.budget_pages(), nodes=facts, idle=evidence.idle,
                samples=evidence.samples, regions=evidence.regions))
        except TraceError as e:
            self._close_trace()
            self._stop_recording(e)

    def _close_trace(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def _stop_recording(self, error: TraceError) -> None:
        """Recording is an aid: a full disk ends it, not the daemon."""
        log.error("recording off: %s", error)
        self.state.record_error("record", f"recording off: {error}")

    def publish(self, facts: list[NodeFacts], summary: IntervalSummary) -> None:
        tier_ids = {t.rank: t.id for t in self.topology.tiers}
        self.state.set_nodes([self._usage(f, tier_ids.get(f.tier, f.tier)) for f in facts])
        for f in facts:
            self.state.set_heat_strip(f.node, self._view(("strip", f.ranges),
                                                         partial(self._strip, f)))
        tracked = self._view(("tracked",), self.heat.tracked_count)
        self.state.set_sizes(tracked, *self.pipeline.mover.footprint())
        self.state.finish_interval()

    def _view(self, key: Hashable, compute: Callable[[], _V]) -> _V:
        """A view of the heat model, computed again only after the model changed (each is
        a pass over the host, and an interval that moved nothing changes nothing)."""
        version = self.heat.version
        known = self._views.get(key)
        if known is not None and known[0] == version:
            return cast(_V, known[1])
        value = compute()
        self._views[key] = (version, value)
        return value

    def _usage(self, f: NodeFacts, tier_id: int) -> NodeUsage:
        """The node's memory, its policy floor and where its tracked pages' heat sits."""
        assert self.heat is not None
        cold, warm, hot = self._view(("classes", f.ranges), partial(self._class_counts, f))
        return NodeUsage(f.node, tier_id, f.managed_pages * PAGE_SIZE, f.free_pages * PAGE_SIZE,
                         tier_rank=f.tier, keep_free_bytes=self._keep_free.get(f.node, 0) *
                         PAGE_SIZE, hot_bytes=hot * PAGE_SIZE, warm_bytes=warm * PAGE_SIZE,
                         cold_bytes=cold * PAGE_SIZE)

    def _class_counts(self, f: NodeFacts) -> tuple[int, int, int]:
        counts = [self.heat.class_counts(start, end) for start, end in f.ranges]
        cold, warm, hot = (sum(c[i] for c in counts) for i in range(3))
        return cold, warm, hot

    def _strip(self, f: NodeFacts) -> list[float]:
        """Mean heat (in accesses) of HEAT_STRIP_BINS equal slices of the node's PFNs."""
        pieces = [self.heat.heat[s:min(e, self.heat.npfns)] for s, e in f.ranges]
        size = sum(p.size for p in pieces)
        if size < HEAT_STRIP_BINS:
            return []
        edges = np.linspace(0, size, HEAT_STRIP_BINS + 1).astype(np.intp)
        sums = np.array([_sum_between(pieces, low, high) for low, high in pairwise(edges)],
                        dtype=np.uint64)
        return [float(m) for m in sums / np.diff(edges) / HEAT_SCALE]


def _sum_between(pieces: list[npt.NDArray[np.uint8]], low: int, high: int) -> int:
    """The sum of items [low, high) of the pieces laid end to end, without joining them:
    a joined copy, or np.add.reduceat's cast of it, costs 1 and 8 bytes a PFN."""
    total, at = 0, 0
    for piece in pieces:
        start, end = max(low, at), min(high, at + piece.size)
        if start < end:
            total += int(piece[start - at:end - at].sum(dtype=np.uint64))
        at += piece.size
    return total


def describe(summary: IntervalSummary, page_size: int) -> str:
    """'promoted 120 pages (0.5 MiB) 1->0, demoted ...; failures EBUSY=2' (no addresses)."""
    parts = []
    for (direction, source, target), pages in sorted(summary.moved.items()):
        if pages:
            verb = "promoted" if direction is Direction.PROMOTE else "demoted"
            parts.append(f"{verb} {pages} pages ({pages * page_size / (1 << 20):.1f} MiB) "
                         f"{source}->{target}")
    text = ", ".join(parts) or "nothing moved"
    if summary.deferred:
        text += f"; {summary.deferred} pages deferred by the rate limit"
    if summary.failures:
        text += "; not moved: " + ", ".join(f"{k}={v}" for k, v in
                                            sorted(summary.failures.items()))
    return text
