"""The daemon loop: collectors -> heat -> policy -> movers, once per interval.

One interval is `Daemon.step()`, which runs these stages in order, each its
own method and each timed into the state:

    collect   read the interval's evidence (idle bitmap, perf samples, DAMON)
    heat      decay, fold the evidence in, reclassify
    rmap      (PID mover) refresh the reverse map; track the pages it found
    policy    one decision pass over the node targets from the topology
    move      carry the plan out batch by batch (or count it, in dry-run)

`run(stop)` repeats step() every `interval` seconds until `stop` is set; a
stop during the move stage lets the batch in flight finish. `reload(config)`
queues a validated config; the next step swaps it in before collecting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tierd import policy
from tierd.collectors.damon import DamonCollector, ProcessDamonCollector, paddr_attrs
from tierd.collectors.evidence import IdleScan, RegionBatch, SampleBatch
from tierd.collectors.idle import IdleCollector
from tierd.collectors.perf_bcc import BccSampleCollector, perf_collector
from tierd.collectors.perf_samples import PerfSampleCollector, online_cpus
from tierd.collectors.topology import Topology, read_topology
from tierd.config import Config, PerfCollectorConfig
from tierd.errors import HostMismatch, KernelFileError, TierdError
from tierd.heat import HEAT_SCALE, HeatModel, HeatParams
from tierd.kernel import move_phys, pmu
from tierd.kernel.damon_sysfs import MonitoringAttrs
from tierd.kernel.kernel_tiering import read_kernel_tiering
from tierd.kernel.pagemap import PAGE_SIZE
from tierd.kernel.root import HOST, HostRoot
from tierd.kernel.zoneinfo import read_zoneinfo
from tierd.movers import safety
from tierd.movers.dry_run import WouldMoveLedger
from tierd.movers.phys import MovePhysPages, PhysMover
from tierd.movers.pid import PidMover
from tierd.movers.rmap import ReverseMap
from tierd.movers.safety import Exclusions, ProcessFilter
from tierd.movers.status import BatchResult, MoverParams
from tierd.policy import Batch, NodeFacts, Plan, PolicyParams
from tierd.probe import Health as ProbeHealth
from tierd.probe import State
from tierd.state import DaemonState, Direction, Health, NodeUsage
from tierd.trace import IntervalRecord, TraceWriter

log = logging.getLogger(__name__)

HEAT_STRIP_BINS = 64
# Pinned frames (mlocked, unevictable, excluded) are reconsidered this often: their
# pages may have been unlocked, freed or their owner may have exited.
UNPIN_EVERY_INTERVALS = 30


@dataclass(frozen=True)
class Settings:
    """The parts of the Config the loop uses, as the plain parameter types of each module."""

    interval: float
    dry_run: bool
    heat: HeatParams
    policy: PolicyParams
    headroom_percent: float
    rate_mb_per_s: float
    mover_kind: str
    mover: MoverParams
    exclusions: Exclusions
    kernel_tiering: str
    idle_interval: float

    @classmethod
    def from_config(cls, config: Config, dry_run: bool = False) -> Settings:
        p, m = config.policy, config.movers
        return cls(
            interval=config.interval,
            dry_run=config.dry_run or dry_run,
            heat=HeatParams(decay=p.heat_decay, hot_threshold=p.hot_threshold,
                            cold_threshold=p.cold_threshold,
                            # A moved page sits out one round more than the hysteresis:
                            # never moved back on one round's evidence.
                            cooldown_intervals=p.hysteresis_intervals + 1),
            policy=PolicyParams(hysteresis_intervals=p.hysteresis_intervals,
                                promote_share=p.budget_split.promote),
            headroom_percent=p.headroom_percent,
            rate_mb_per_s=m.rate_mb_per_s,
            mover_kind=m.kind,
            mover=MoverParams(batch_pages=m.batch_pages, move_all_shared=m.move_all_shared),
            exclusions=Exclusions(pids=config.exclusions.pids, comms=config.exclusions.comms,
                                  cgroups=config.exclusions.cgroups),
            kernel_tiering=config.kernel_tiering,
            idle_interval=config.collectors.idle.interval,
        )

    def budget_pages(self, page_size: int = PAGE_SIZE) -> int:
        return int(self.rate_mb_per_s * self.interval * (1 << 20) // page_size)


@dataclass
class Evidence:
    idle: list[IdleScan] = field(default_factory=list)
    samples: list[SampleBatch] = field(default_factory=list)
    regions: list[RegionBatch] = field(default_factory=list)
    # A round of evidence is complete: an idle scan was due, or there is no idle scan.
    new_round: bool = True


@dataclass
class IntervalSummary:
    """What one interval did (page counts by (direction, source, target); no addresses)."""

    moved: Counter[tuple[Direction, int, int]] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    planned: int = 0
    deferred: int = 0


def _health(h: ProbeHealth) -> tuple[Health, str]:
    mapping = {State.OK: Health.OK, State.DEGRADED: Health.DEGRADED,
               State.UNAVAILABLE: Health.DISABLED}
    return mapping[h.state], h.reason


def node_facts(topology: Topology) -> list[NodeFacts]:
    facts = []
    for node in topology.nodes.values():
        if not node.has_memory or node.tier_rank is None:
            continue
        facts.append(NodeFacts(
            node=node.id, tier=node.tier_rank, ranges=tuple(node.pfn_ranges),
            managed_pages=node.managed_pages, free_pages=node.free_pages,
            watermark_pages=max(node.watermark_high, node.watermark_promo or 0)))
    return facts


class Daemon:
    def __init__(self, config: Config, root: HostRoot = HOST, state: DaemonState | None = None,
                 dry_run: bool = False, record: Path | None = None) -> None:
        self.root = root
        self.config = config
        self._dry_run_flag = dry_run
        self.settings = Settings.from_config(config, dry_run)
        self.state = state or DaemonState(page_size=PAGE_SIZE)
        self.state.dry_run = self.settings.dry_run
        self.stop_event = threading.Event()
        self._pending: Config | None = None
        self._reload_lock = threading.Lock()
        self._record_path = record
        self._trace: TraceWriter | None = None
        self.topology: Topology | None = None
        self.heat: HeatModel | None = None
        self.idle: IdleCollector | None = None
        self.perf: PerfSampleCollector | BccSampleCollector | None = None
        self.damon: DamonCollector | ProcessDamonCollector | None = None
        self.rmap: ReverseMap | None = None
        self.mover: PidMover | PhysMover | None = None
        self._memcg_inodes: frozenset[int] = frozenset()
        self._process_filter = ProcessFilter(self.settings.exclusions, self.root)
        self._excluded_pfns = np.zeros(0, dtype=np.uint64)
        self._idle_due_at: float | None = None
        self._keep_free: dict[int, int] = {}  # node -> pages the policy keeps free
        self._would_move = WouldMoveLedger()

    # --- start and stop ------------------------------------------------------------

    def start(self) -> None:
        """Check the kernel's own tiering, read the topology, open collectors and mover."""
        tiering = read_kernel_tiering(self.root)
        self.state.kernel_tiering = safety.check_kernel_tiering(tiering,
                                                                self.settings.kernel_tiering)
        self.topology = read_topology(self.root)
        facts = node_facts(self.topology)
        if len({f.tier for f in facts}) < 2:
            log.warning("only one memory tier (%s): nothing to tier, tierd will only observe",
                        ", ".join(f"node {f.node}" for f in facts))
        npfns = max((e for f in facts for _, e in f.ranges), default=0)
        self.heat = HeatModel(npfns, self.settings.heat)
        self._open_collectors(facts)
        self._open_mover()
        self._memcg_inodes = safety.excluded_memcg_inodes(self.settings.exclusions, self.root)
        if self._record_path:
            self._trace = TraceWriter(self._record_path)
        log.info("tierd started: %d nodes in %d tiers, mover %s, %s, interval %.1fs, "
                 "budget %.0f MB/s", len(facts), len({f.tier for f in facts}), self.state.mover,
                 "DRY RUN" if self.settings.dry_run else "moving pages", self.settings.interval,
                 self.settings.rate_mb_per_s)

    def _open_collectors(self, facts: list[NodeFacts]) -> None:
        cfg = self.config.collectors
        assert self.topology is not None
        if cfg.idle.enabled:
            self.idle = IdleCollector(self.topology, list(cfg.idle.nodes) or None,
                                      cfg.idle.pfns_per_second, self.root)
            self.idle.mark()
            # The first scan reads back after one interval, not a whole idle interval:
            # evidence arrives from the start.
            self._idle_due_at = time.monotonic() + min(self.settings.interval,
                                                       self.settings.idle_interval)
            self._set_health("idle", self.idle.health)
            if self.idle.health.state is State.UNAVAILABLE:
                self.idle.close()
                self.idle = None
        if cfg.perf.enabled:
            self._open_perf(cfg.perf)
        if cfg.damon.enabled or (self.idle is None and self.perf is None):
            if not cfg.damon.enabled:
                log.info("no idle-page tracking and no memory-sampling PMU: using DAMON")
            sample_us = int(cfg.damon.sampling_interval * 1e6)
            aggr_us = int(cfg.damon.aggregation_interval * 1e6)
            if cfg.damon.operations == "vaddr":
                self.damon = ProcessDamonCollector(
                    self._process_filter, MonitoringAttrs(sample_us, aggr_us), self.root)
            else:
                self.damon = DamonCollector([r for f in facts for r in f.ranges],
                                            paddr_attrs(sample_us, aggr_us), self.root)
            if not self.damon.start():
                self._set_health("damon", self.damon.health)
                self.damon = None
        if self.idle is None and self.perf is None and self.damon is None:
            log.warning("no collector is usable: tierd can only observe")

    def _open_perf(self, cfg: PerfCollectorConfig) -> None:
        try:
            event = self._perf_event(cfg.events)
        except TierdError as e:
            self.state.set_collector("perf", Health.DISABLED, str(e))
            return
        event = replace(event, sample_period=cfg.sample_period)
        # The bcc backend falls back to the ctypes ring, saying why, when it cannot run.
        self.perf = perf_collector(cfg.backend, event, online_cpus(self.root), self.root)
        self._set_health("perf", self.perf.health)
        if self.perf.health.state is not State.OK:
            self.perf.close()
            self.perf = None

    def _perf_event(self, events: tuple[str, ...]) -> pmu.MemoryEvent:
        """The first configured event this host can sample, or the best one it offers."""
        if not events:
            return pmu.memory_event(self.root, None)
        reasons = []
        for name in events:
            try:
                return pmu.memory_event(self.root, name)
            except TierdError as e:
                reasons.append(f"{name}: {e}")
        raise TierdError("no configured perf event is usable: " + "; ".join(reasons))

    def _open_mover(self) -> None:
        kind = self.settings.mover_kind
        syscall, why_not = (None, "movers.kind is 'pid'") if kind == "pid" else \
            self._move_phys_syscall()
        if kind == "phys" and syscall is None:
            raise HostMismatch(f"movers.kind is 'phys' but move_phys_pages is unusable: {why_not}")
        if syscall is not None:
            self.mover = PhysMover(syscall, self.settings.mover)
        else:
            log.info("PID mover (move_pages through the reverse map): %s", why_not)
            self.rmap = ReverseMap(self._process_filter, self.root)
            self.mover = PidMover(self.rmap, self.settings.mover, self.root)
        self.state.mover = self.mover.name

    def _move_phys_syscall(self) -> tuple[MovePhysPages | None, str]:
        """move_phys_pages when its probe proved this kernel implements it, else why not."""
        support = move_phys.probe(self.root)
        if not support.usable:
            return None, support.reason
        return move_phys.move_phys_pages_into, ""

    def close(self) -> None:
        for collector in (self.idle, self.perf):
            if collector is not None:
                collector.close()
        if self.damon is not None:
            self.damon.stop()
        if self._trace is not None:
            self._trace.close()

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
        if config.collectors != self.config.collectors or config.movers.kind != \
                self.config.movers.kind:
            log.warning("config reload: collector and mover changes take effect at restart")
        self.config = config
        self.settings = Settings.from_config(config, self._dry_run_flag)
        self.state.dry_run = self.settings.dry_run
        assert self.heat is not None
        self.heat.set_params(self.settings.heat)
        self._process_filter = ProcessFilter(self.settings.exclusions, self.root)
        if self.mover is not None:
            self.mover.params = self.settings.mover
        if self.rmap is not None:
            self.rmap.filter = self._process_filter
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
        # move) counts against the wait, or every round would stretch by it.
        while not wait(max(0.0, self.settings.interval - took)):
            started = time.monotonic()
            summary = self.step()
            took = time.monotonic() - started
            if on_interval is not None:
                on_interval(summary)
            if once:
                break

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.state.record_duration(name, time.perf_counter() - started)

    def step(self) -> IntervalSummary:
        """One interval: collect, heat, rmap, policy, move, publish."""
        self._apply_pending()
        if self.heat is not None and self.state.intervals % UNPIN_EVERY_INTERVALS == \
                UNPIN_EVERY_INTERVALS - 1:
            self.heat.unpin_all()
        with self._stage("collect"):
            self.topology = read_topology(self.root)
            evidence = self.collect()
        with self._stage("heat"):
            self.update_heat(evidence)
        with self._stage("rmap"):
            self.refresh_rmap()
        facts = node_facts(self.topology)
        with self._stage("policy"):
            plan = self.decide(facts)
        self._record(facts, evidence)
        with self._stage("move"):
            summary = self.move(plan)
        self.publish(facts, summary)
        return summary

    def collect(self) -> Evidence:
        evidence = Evidence()
        if self.idle is not None and self._idle_due_at is not None:
            # Heat ages by idle scan, not by interval: between two scans no round ends.
            # The scan is read back at the interval boundary nearest its due time; a
            # strict ">= due" would skip to the next boundary whenever the scan
            # itself took a moment (a 10 s scan, 5 s interval: every 15 s).
            evidence.new_round = (time.monotonic()
                                  >= self._idle_due_at - self.settings.interval / 2)
        if evidence.new_round and self.idle is not None:
            evidence.idle = self.idle.collect()
            self.idle.mark()
            self._idle_due_at = time.monotonic() + self.settings.idle_interval
            self._set_health("idle", self.idle.health)
        if self.perf is not None:
            batch = self.perf.collect()
            evidence.samples.append(batch)
            self.state.record_samples(int(batch.pfns.size), batch.lost, batch.unresolved)
            self._set_health("perf", self.perf.health)
        if self.damon is not None:
            regions = self.damon.collect()
            if regions is not None:
                evidence.regions.append(regions)
            self._set_health("damon", self.damon.health)
        return evidence

    def update_heat(self, evidence: Evidence) -> None:
        assert self.heat is not None
        self._excluded_pfns = safety.excluded_process_pfns(self._process_filter, self.root)
        self._pin_unmovable(self.heat.fold(evidence.idle, evidence.samples, evidence.regions,
                                           new_round=evidence.new_round))

    def _pin_unmovable(self, new: np.ndarray) -> None:
        """Pin newly tracked frames a mover must never touch, before the policy sees them."""
        assert self.heat is not None
        pfns = np.unique(new)
        movable, _, dropped = safety.drop_pinned(pfns, self.root, self._memcg_inodes,
                                                 self._excluded_pfns)
        for reason, count in dropped.items():
            self.state.record_excluded(reason, count)
        self.heat.pin(np.setdiff1d(pfns, movable, assume_unique=True))

    def refresh_rmap(self) -> None:
        if self.rmap is None:
            return
        stats = self.rmap.refresh()
        for error in stats.errors[:3]:
            self.state.record_error("rmap", error)
        if self.idle is None:
            # Without the idle bitmap, the reverse map is what says which PFNs are user pages.
            assert self.heat is not None
            self._pin_unmovable(self.heat.track(self.rmap.pfn))

    def decide(self, facts: list[NodeFacts]) -> Plan:
        assert self.heat is not None
        targets = policy.targets(facts, self.settings.headroom_percent)
        self._keep_free = {t.node: t.keep_free_pages for t in targets}
        plan = policy.decide(self.heat.heat, self.heat.mark, targets,
                             self.settings.budget_pages(), self.settings.policy)
        self.state.record_rate_limited(plan.deferred_pages)
        return plan

    def move(self, plan: Plan) -> IntervalSummary:
        summary = IntervalSummary(planned=plan.pages(), deferred=plan.deferred_pages)
        full: set[int] = set()
        # Promotions come after every demotion and take the room the kernel reports
        # then: a failed demotion the node did not need costs no promotion.
        room: dict[int, int] | None = None
        for index, batch in enumerate(plan.batches):
            if self.stop_event.is_set():
                log.info("stopping: %d batches of this interval not started",
                         len(plan.batches) - index)
                break
            if batch.target in full:
                summary.failures["target_full"] += batch.pfns.size
                continue
            if batch.direction is Direction.PROMOTE and not self.settings.dry_run:
                room = self._room_now() if room is None else room
                batch = self._trim(batch, room, summary)
                if not batch.pfns.size:
                    continue
            result = self._move_batch(batch, summary)
            if result is not None and result.target_full:
                full.add(batch.target)
        self.state.record_failures(summary.failures)
        return summary

    def _room_now(self) -> dict[int, int]:
        """Free pages above keep_free per node, as the kernel counts them now ({} if unknown)."""
        try:
            zones = read_zoneinfo(self.root)
        except KernelFileError as e:
            self.state.record_error("topology", str(e))
            return {}
        return {node: sum(z.free for z in zones.of_node(node)) - keep
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
        assert self.heat is not None and self.mover is not None
        pfns, flags, dropped = safety.drop_pinned(batch.pfns, self.root, self._memcg_inodes,
                                                  self._excluded_pfns)
        for reason, count in dropped.items():
            self.state.record_excluded(reason, count)
        self.heat.pin(np.setdiff1d(batch.pfns, pfns, assume_unique=True))
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
        result = self.mover.move(Batch(batch.direction, batch.source, batch.target, pfns),
                                 flags)
        self.state.record_moved(*key, int(result.moved.size))
        summary.moved[key] += int(result.moved.size)
        summary.failures.update(result.failures)
        known = result.new_pfns != 0
        self.heat.transfer(result.moved[known], result.new_pfns[known])
        self.heat.vacate(result.moved[~known])
        # A frame whose page vanished or is not where tierd thought: forget it (the next
        # scan or refresh finds what lives there now) instead of retrying it forever.
        self.heat.vacate(result.stale)
        self.heat.cool_down(np.setdiff1d(result.not_moved, result.stale))
        return result

    # --- outputs ----------------------------------------------------------------------

    def _record(self, facts: list[NodeFacts], evidence: Evidence) -> None:
        if self._trace is None:
            return
        assert self.heat is not None
        self._trace.write(IntervalRecord(
            npfns=self.heat.npfns, page_size=PAGE_SIZE, interval_seconds=self.settings.interval,
            budget_pages=self.settings.budget_pages(), nodes=facts, idle=evidence.idle,
            samples=evidence.samples, regions=evidence.regions))

    def publish(self, facts: list[NodeFacts], summary: IntervalSummary) -> None:
        assert self.heat is not None and self.topology is not None
        tier_ids = {t.rank: t.id for t in self.topology.tiers}
        self.state.set_nodes([NodeUsage(f.node, tier_ids.get(f.tier, f.tier),
                                        f.managed_pages * PAGE_SIZE, f.free_pages * PAGE_SIZE)
                              for f in facts])
        for f in facts:
            self.state.set_heat_strip(f.node, self._strip(f))
        self.state.set_sizes(self.heat.tracked_count(),
                             self.rmap.pages if self.rmap else 0,
                             self.rmap.nbytes if self.rmap else 0)
        self.state.finish_interval()
        log.info("interval %d: %s", self.state.intervals, describe(summary, PAGE_SIZE))

    def _strip(self, f: NodeFacts) -> list[float]:
        """Mean heat (in accesses) of HEAT_STRIP_BINS equal slices of the node's PFNs."""
        assert self.heat is not None
        heat = np.concatenate([self.heat.heat[s:min(e, self.heat.npfns)] for s, e in f.ranges])
        if heat.size < HEAT_STRIP_BINS:
            return []
        edges = np.linspace(0, heat.size, HEAT_STRIP_BINS + 1).astype(np.intp)
        sums = np.add.reduceat(heat, edges[:-1], dtype=np.uint64)
        return (sums / np.diff(edges) / HEAT_SCALE).tolist()

    def _set_health(self, name: str, health: ProbeHealth) -> None:
        value, reason = _health(health)
        self.state.set_collector(name, value, reason)


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
