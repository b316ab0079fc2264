"""The daemon: its observable state, the interval loop, `tierd run` and `tierd simulate`."""

from __future__ import annotations

from tierd.state import DaemonState, Direction, Health


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
    state.set_collector("idle", Health.DEGRADED, "page_idle missing")
    state.record_duration("policy", 0.5)
    snap = state.snapshot()
    state.record_failures({"EBUSY": 1})
    state.set_collector("idle", Health.OK)
    state.record_duration("policy", 0.25)
    assert snap.failures["EBUSY"] == 3
    assert snap.collectors["idle"].health is Health.DEGRADED
    assert snap.durations["policy"].total_seconds == 0.5
    assert state.snapshot().durations["policy"].count == 2


def test_last_errors_are_bounded() -> None:
    state = DaemonState()
    for i in range(100):
        state.record_error("mover:pid", f"error {i}")
    errors = state.snapshot().last_errors
    assert len(errors) == 20 and errors[-1].message == "error 99"
