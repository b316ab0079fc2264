"""The daemon's telemetry: the counters and health the metrics exporter reads.

The daemon loop is the only writer; readers (the Prometheus collector, the
`run` command's summary) call `snapshot()`, which copies everything under
one lock so a scrape never sees half an interval. Counters only grow; nothing
here holds a physical address or a pid.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from tierd.vocabulary import Direction, Health, State

# Stages whose durations are recorded each interval.
STAGES = ("collect", "heat", "policy", "rmap", "move")
LAST_ERRORS_KEPT = 20
MESSAGE_CHARS = 500  # an error kept for the status page; a hostile file must not fill it
# Upper bounds (seconds) of the stage-duration histogram buckets; +Inf is implicit.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class CollectorHealth:
    state: State = State.OK
    reason: str = ""
    last_ok: float | None = None  # time.time() of the last good collection


@dataclass(frozen=True)
class ErrorRecord:
    at: float  # time.time()
    source: str  # "collector:idle", "mover:pid", "config", ...
    message: str


@dataclass
class StageDuration:
    last_seconds: float = 0.0
    total_seconds: float = 0.0
    cpu_seconds: float = 0.0  # the daemon thread's CPU (user + system) in the stage
    count: int = 0
    # bucket_counts[i]: durations <= DURATION_BUCKETS[i] (cumulative, as Prometheus wants)
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))


@dataclass(frozen=True)
class NodeUsage:
    """A NUMA node's memory as the daemon last saw it (no addresses)."""

    node: int
    tier: int  # N of /sys/devices/virtual/memory_tiering/memory_tierN (lower is faster)
    total_bytes: int
    free_bytes: int
    tier_rank: int = 0  # the tier's place in the hierarchy: 0 is the fastest
    keep_free_bytes: int = 0  # what the policy keeps free: watermark + headroom
    # Tracked pages on the node by heat class: is the hot memory on the fast tier?
    hot_bytes: int = 0
    warm_bytes: int = 0
    cold_bytes: int = 0


# Key of the move counters: (direction, source node, target node).
MoveKey = tuple[Direction, int, int]


@dataclass
class StateSnapshot:
    """A consistent copy of the daemon state (see DaemonState for the meaning of fields)."""

    started_at: float
    dry_run: bool
    mover: str
    kernel_tiering: str
    page_size: int
    intervals: int
    last_interval_at: float | None
    pages_moved: Counter[MoveKey]
    bytes_moved: Counter[MoveKey]
    pages_would_move: Counter[MoveKey]
    pages_attempted: Counter[MoveKey]
    failures: Counter[str]
    samples_taken: int
    samples_lost: int
    samples_unresolved: int
    rate_limit_hits: int
    pages_deferred_by_rate_limit: int
    pages_excluded: Counter[str]
    pages_pingpong: Counter[str]
    durations: dict[str, StageDuration]
    collectors: dict[str, CollectorHealth]
    tracked_pages: int
    rmap_pages: int
    rmap_bytes: int
    last_errors: list[ErrorRecord]
    errors: Counter[str]
    failing: str | None
    nodes: dict[int, NodeUsage]
    heat_strips: dict[int, tuple[float, ...]]


@dataclass
class DaemonState:
    """Everything the daemon reports about itself. Thread safe; one writer."""

    dry_run: bool = False
    mover: str = "none"  # "phys", "pid" or "none"
    kernel_tiering: str = "off"  # what the kernel's own tiering is doing
    page_size: int = 4096
    started_at: float = field(default_factory=time.time)
    intervals: int = 0
    last_interval_at: float | None = None
    # Pages (and bytes) that reached their target node, per direction and node pair.
    pages_moved: Counter[MoveKey] = field(default_factory=Counter)
    bytes_moved: Counter[MoveKey] = field(default_factory=Counter)
    # Dry run: pages that would have been moved (nothing was).
    pages_would_move: Counter[MoveKey] = field(default_factory=Counter)
    # Pages handed to a mover (moved or not).
    pages_attempted: Counter[MoveKey] = field(default_factory=Counter)
    # Pages not moved, by reason: an errno name from the per-page status
    # ("ENOENT", "EBUSY", ...) or a call-level reason ("process_gone",
    # "call_EPERM", "busy_retries_exhausted", "not_in_rmap", ...).
    failures: Counter[str] = field(default_factory=Counter)
    samples_taken: int = 0
    samples_lost: int = 0
    samples_unresolved: int = 0
    # Intervals in which the migration budget cut the plan, and the pages it held back.
    rate_limit_hits: int = 0
    pages_deferred_by_rate_limit: int = 0
    # Candidate pages skipped by a safety rule or out of the mover's reach: "mlocked",
    # "unevictable", "excluded_process", "node_not_allowed", "unreachable".
    pages_excluded: Counter[str] = field(default_factory=Counter)
    # Pages moved back within the move history's window, by the direction of the move back.
    pages_pingpong: Counter[str] = field(default_factory=Counter)
    durations: dict[str, StageDuration] = field(
        default_factory=lambda: {s: StageDuration() for s in STAGES})
    collectors: dict[str, CollectorHealth] = field(default_factory=dict)
    tracked_pages: int = 0  # PFNs with heat
    rmap_pages: int = 0  # PFN -> (pid, vaddr) entries in the reverse map
    rmap_bytes: int = 0
    last_errors: deque[ErrorRecord] = field(
        default_factory=lambda: deque(maxlen=LAST_ERRORS_KEPT))
    # Every error recorded, by source (the last few are in last_errors); an interval
    # cut short counts under the stage that raised it.
    errors: Counter[str] = field(default_factory=Counter)
    # Why the last interval failed ("stage: error"), None once one completes.
    failing: str | None = None
    nodes: dict[int, NodeUsage] = field(default_factory=dict)  # node -> usage
    # node -> mean heat in equal-width bins across the node's PFN range, low
    # PFNs first (a picture for the status page: positions, never addresses).
    heat_strips: dict[int, tuple[float, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_moved(self, direction: Direction, source: int, target: int, pages: int) -> None:
        with self._lock:
            key = (direction, source, target)
            if self.dry_run:
                self.pages_would_move[key] += pages
            else:
                self.pages_moved[key] += pages
                self.bytes_moved[key] += pages * self.page_size

    def record_attempted(self, direction: Direction, source: int, target: int,
                         pages: int) -> None:
        with self._lock:
            self.pages_attempted[(direction, source, target)] += pages

    def record_failures(self, reasons: Counter[str] | dict[str, int]) -> None:
        with self._lock:
            self.failures.update(reasons)

    def record_excluded(self, reason: str, pages: int) -> None:
        if pages:
            with self._lock:
                self.pages_excluded[reason] += pages

    def record_pingpong(self, direction: Direction, pages: int) -> None:
        if pages:
            with self._lock:
                self.pages_pingpong[direction.value] += pages

    def record_samples(self, taken: int, lost: int, unresolved: int) -> None:
        with self._lock:
            self.samples_taken += taken
            self.samples_lost += lost
            self.samples_unresolved += unresolved

    def record_rate_limited(self, deferred_pages: int) -> None:
        if deferred_pages:
            with self._lock:
                self.rate_limit_hits += 1
                self.pages_deferred_by_rate_limit += deferred_pages

    def record_duration(self, stage: str, seconds: float, cpu_seconds: float = 0.0) -> None:
        with self._lock:
            d = self.durations.setdefault(stage, StageDuration())
            d.last_seconds = seconds
            d.total_seconds += seconds
            d.cpu_seconds += cpu_seconds
            d.count += 1
            for i, bound in enumerate(DURATION_BUCKETS):
                if seconds <= bound:
                    d.bucket_counts[i] += 1

    def set_collector(self, name: str, health: Health) -> None:
        with self._lock:
            entry = self.collectors.setdefault(name, CollectorHealth())
            entry.state = health.state
            entry.reason = health.reason
            if health.state is State.OK:
                entry.last_ok = time.time()

    def record_error(self, source: str, message: str) -> None:
        with self._lock:
            self.last_errors.append(ErrorRecord(time.time(), source, _bounded(message)))
            self.errors[source] += 1

    def count_errors(self, source: str, count: int) -> None:
        """Errors counted but not kept (a burst's first few went through record_error)."""
        with self._lock:
            self.errors[source] += count

    def record_stage_failure(self, stage: str, message: str) -> None:
        with self._lock:
            self.errors[stage] += 1
            self.failing = _bounded(f"{stage}: {message}")
            self.last_errors.append(ErrorRecord(time.time(), f"stage:{stage}",
                                                _bounded(message)))

    def set_sizes(self, tracked_pages: int, rmap_pages: int, rmap_bytes: int) -> None:
        with self._lock:
            self.tracked_pages = tracked_pages
            self.rmap_pages = rmap_pages
            self.rmap_bytes = rmap_bytes

    def set_nodes(self, usages: list[NodeUsage]) -> None:
        with self._lock:
            self.nodes = {u.node: u for u in usages}

    def set_heat_strip(self, node: int, bins: list[float] | tuple[float, ...]) -> None:
        with self._lock:
            self.heat_strips[node] = tuple(float(b) for b in bins)

    def finish_interval(self) -> None:
        with self._lock:
            self.intervals += 1
            self.last_interval_at = time.time()
            self.failing = None

    def snapshot(self) -> StateSnapshot:
        with self._lock:
            return StateSnapshot(
                started_at=self.started_at, dry_run=self.dry_run, mover=self.mover,
                kernel_tiering=self.kernel_tiering, page_size=self.page_size,
                intervals=self.intervals, last_interval_at=self.last_interval_at,
                pages_moved=Counter(self.pages_moved), bytes_moved=Counter(self.bytes_moved),
                pages_would_move=Counter(self.pages_would_move),
                pages_attempted=Counter(self.pages_attempted), failures=Counter(self.failures),
                samples_taken=self.samples_taken, samples_lost=self.samples_lost,
                samples_unresolved=self.samples_unresolved,
                rate_limit_hits=self.rate_limit_hits,
                pages_deferred_by_rate_limit=self.pages_deferred_by_rate_limit,
                pages_excluded=Counter(self.pages_excluded),
                pages_pingpong=Counter(self.pages_pingpong),
                durations=copy.deepcopy(self.durations),
                collectors=copy.deepcopy(self.collectors),
                tracked_pages=self.tracked_pages, rmap_pages=self.rmap_pages,
                rmap_bytes=self.rmap_bytes, last_errors=list(self.last_errors),
                errors=Counter(self.errors), failing=self.failing,
                nodes=dict(self.nodes), heat_strips=dict(self.heat_strips),
            )


def _bounded(message: str) -> str:
    return message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 3] + "..."
