"""A daemon state as it looks after a few intervals on a two-tier host, for the service tests."""

from __future__ import annotations

import time
from collections import Counter

from tierd.config import ReloadStatus
from tierd.telemetry import DaemonState, NodeUsage
from tierd.vocabulary import Direction, Health, State

GIB = 1 << 30
PROMOTED_PAGES = 300  # node 1 -> node 0
DEMOTED_PAGES = 120  # node 0 -> node 1
HEAT_BINS = 64
HOT_ON_FAST = 600 << 20
HOT_ON_SLOW = 24 << 20


def populated_state(dry_run: bool = False) -> DaemonState:
    state = DaemonState(dry_run=dry_run, mover="pid", kernel_tiering="off")
    state.set_nodes([
        NodeUsage(0, 4, 2 * GIB, GIB // 2, tier_rank=0, keep_free_bytes=GIB // 4,
                  hot_bytes=HOT_ON_FAST, warm_bytes=GIB // 4, cold_bytes=GIB // 8),
        NodeUsage(1, 54, 2 * GIB, 3 * GIB // 2, tier_rank=1, keep_free_bytes=GIB // 8,
                  hot_bytes=HOT_ON_SLOW, cold_bytes=GIB // 4)])
    state.set_heat_strip(0, [float(i % 8) for i in range(HEAT_BINS)])
    state.set_heat_strip(1, [0.0] * (HEAT_BINS - 4) + [9.0, 7.0, 0.5, 0.0])
    state.record_attempted(Direction.PROMOTE, 1, 0, PROMOTED_PAGES + 25)
    state.record_moved(Direction.PROMOTE, 1, 0, PROMOTED_PAGES)
    state.record_attempted(Direction.DEMOTE, 0, 1, DEMOTED_PAGES)
    state.record_moved(Direction.DEMOTE, 0, 1, DEMOTED_PAGES)
    state.record_failures(Counter(EBUSY=20, ENOENT=5))
    state.record_excluded("mlocked", 7)
    state.record_samples(taken=5000, lost=12, unresolved=40)
    state.record_rate_limited(64)
    for seconds in (0.004, 0.03, 0.2):
        state.record_duration("collect", seconds, cpu_seconds=seconds / 2)
        state.record_duration("policy", seconds / 10)
    state.set_collector("idle", Health())
    state.set_collector("perf", Health(State.DISABLED, "no IBS or PEBS on this CPU"))
    state.record_error("mover:pid", "a process exited during the move")
    state.record_stage_failure("collect", "OSError: [Errno 24] Too many open files")
    state.record_error("rmap", "pid 4242: pagemap unreadable")
    state.count_errors("rmap", 9)
    state.set_sizes(tracked_pages=1000, rmap_pages=800, rmap_bytes=64000)
    state.finish_interval()
    return state


def failed_reload() -> ReloadStatus:
    return ReloadStatus(False, time.time() - 600,
                        "/etc/tierd/tierd.yaml:3: interval: must be >= 0.1, got 0")
