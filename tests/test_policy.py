"""The policy core: pure decisions from heat, marks and node capacities."""

from __future__ import annotations

import numpy as np
import pytest

from tierd import heat as h
from tierd import policy
from tierd.policy import NodeTarget, PolicyParams
from tierd.vocabulary import Direction

# Pressure and exchange alone (the default), without proactive demotion of cold pages.
PRESSURE_ONLY = PolicyParams(demote_cold=False)
DEMOTE_COLD = PolicyParams(demote_cold=True)
TWO_ROUNDS = PolicyParams(hysteresis_rounds=2)  # the rules that wait for the hysteresis
N0 = (0, 100)  # node 0: PFNs 0-99 (fast), node 1: PFNs 100-199 (slow)
N1 = (100, 200)


def mark(cls: int, streak: int = 7, cooldown: int = 0) -> int:
    return (cooldown << 5) | (cls << 3) | streak


def arrays(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(n, dtype=np.uint8), np.zeros(n, dtype=np.uint8)


def two_nodes(free0: int, keep0: int = 10, free1: int = 1000, keep1: int = 10
              ) -> list[NodeTarget]:
    """Node 0 over node 1, each keeping keep_free pages free while hot pages wait."""
    return [NodeTarget(0, 0, (N0,), free0, keep0, promote_to=None, demote_to=1),
            NodeTarget(1, 1, (N1,), free1, keep1, promote_to=0, demote_to=None)]


def put(heat: np.ndarray, marks: np.ndarray, pfns: list[int] | range, heat_value: int,
        mark_value: int) -> None:
    heat[list(pfns)] = heat_value
    marks[list(pfns)] = mark_value


def hot_waiting(heat: np.ndarray, marks: np.ndarray, pfns: range = range(199, 200)) -> None:
    """Pages hot for one round wait on node 1. Under TWO_ROUNDS they are not settled:
    node 0 makes room for them (its headroom) but exchanges nothing for them."""
    put(heat, marks, list(pfns), 100, mark(h.HOT, streak=1))  # below settle_units


def test_below_headroom_demotes_the_coldest_settled_cold_pages_first() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 10), 5, mark(h.COLD))
    put(heat, marks, [3, 7], 0, mark(h.COLD))
    put(heat, marks, range(10, 20), 40, mark(h.WARM))
    put(heat, marks, range(20, 30), 200, mark(h.HOT))
    hot_waiting(heat, marks, range(100, 200))
    plan = policy.decide(heat, marks, two_nodes(free0=7, keep0=10), budget_pages=100,
                         params=TWO_ROUNDS)
    assert len(plan.batches) == 1
    batch = plan.batches[0]
    assert (batch.direction, batch.source, batch.target) == (Direction.DEMOTE, 0, 1)
    assert batch.pfns.tolist() == [0, 3, 7]  # the two heat-0 pages, then the lowest heat-5 PFN


def test_pressure_falls_back_to_warm_pages_but_never_hot_ones() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 2), 5, mark(h.COLD))
    put(heat, marks, range(10, 20), 40, mark(h.WARM))
    put(heat, marks, [12], 30, mark(h.WARM))
    put(heat, marks, range(20, 30), 200, mark(h.HOT))
    hot_waiting(heat, marks, range(100, 200))
    plan = policy.decide(heat, marks, two_nodes(free0=0, keep0=4), budget_pages=100,
                         params=TWO_ROUNDS)
    assert plan.batches[0].pfns.tolist() == [0, 1, 10, 12]


def test_hot_pages_below_are_promoted_hottest_first_into_the_room() -> None:
    heat, marks = arrays()
    put(heat, marks, range(100, 110), 100, mark(h.HOT))
    put(heat, marks, [105, 108], 250, mark(h.HOT))
    plan = policy.decide(heat, marks, two_nodes(free0=13, keep0=10), budget_pages=100)
    assert [(b.direction, b.source, b.target) for b in plan.batches] == [
        (Direction.PROMOTE, 1, 0)]
    assert plan.batches[0].pfns.tolist() == [100, 105, 108]


def test_no_room_exchanges_settled_cold_for_hot() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 50), 0, mark(h.COLD))
    put(heat, marks, range(50, 100), 200, mark(h.HOT))
    put(heat, marks, range(100, 104), 200, mark(h.HOT))
    put(heat, marks, range(104, 200), 0, mark(h.COLD))
    plan = policy.decide(heat, marks, two_nodes(free0=10, keep0=10), budget_pages=100,
                         params=PolicyParams(demote_cold=False))
    demote, promote = plan.batches
    assert demote.direction is Direction.DEMOTE and demote.pfns.tolist() == [0, 1, 2, 3]
    assert promote.direction is Direction.PROMOTE and promote.pfns.tolist() == [100, 101, 102,
                                                                                 103]


def test_unsettled_or_cooling_pages_do_not_move() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 50), 0, mark(h.COLD, streak=1))
    put(heat, marks, range(50, 100), 0, mark(h.COLD, cooldown=1))
    put(heat, marks, range(100, 150), 100, mark(h.HOT, streak=1))  # below settle_units
    put(heat, marks, range(150, 200), 200, mark(h.HOT, cooldown=2))
    plan = policy.decide(heat, marks, two_nodes(free0=10, keep0=10), budget_pages=100,
                         params=PolicyParams(hysteresis_rounds=2))
    assert plan.batches == () and plan.deferred_pages == 0


def test_heat_worth_two_rounds_settles_a_hot_page_for_an_exchange() -> None:
    """Samples that count accesses say in one round what two idle scans say: on a large
    host, whose rounds are paced scans minutes long, that is what lets it exchange soon."""
    heat, marks = arrays()
    put(heat, marks, range(0, 50), 0, mark(h.COLD))
    put(heat, marks, range(100, 120), 128, mark(h.HOT, streak=1))  # 8.0 accesses
    put(heat, marks, range(120, 140), 127, mark(h.HOT, streak=1))  # just below
    nodes = two_nodes(free0=10, keep0=10)
    plan = policy.decide(heat, marks, nodes, budget_pages=100, params=TWO_ROUNDS)
    assert plan.pages(Direction.DEMOTE) == 20
    assert [b.pfns.tolist() for b in plan.batches if b.direction is Direction.PROMOTE] == [
        list(range(100, 120))]
    never = PolicyParams(hysteresis_rounds=2, settle_units=h.HEAT_MAX + 1)
    assert policy.decide(heat, marks, nodes, budget_pages=100, params=never).batches == ()


def test_budget_is_split_between_directions_and_the_rest_is_deferred() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 50), 0, mark(h.COLD))
    put(heat, marks, range(50, 100), 200, mark(h.HOT))
    put(heat, marks, range(100, 150), 200, mark(h.HOT))
    put(heat, marks, range(150, 200), 0, mark(h.COLD))
    plan = policy.decide(heat, marks, two_nodes(free0=10, keep0=10), budget_pages=20,
                         params=PolicyParams(demote_cold=False))
    assert plan.pages(Direction.DEMOTE) == 10 and plan.pages(Direction.PROMOTE) == 10
    assert plan.deferred_pages == 100 - 20


def test_with_demote_cold_settled_cold_pages_go_down_as_far_as_the_node_below_allows() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 30), 0, mark(h.COLD))
    put(heat, marks, range(30, 40), 0, mark(h.COLD, streak=1))  # not settled yet
    put(heat, marks, range(40, 60), 40, mark(h.WARM))
    plan = policy.decide(heat, marks, two_nodes(free0=500, free1=35, keep1=10), budget_pages=100,
                         params=DEMOTE_COLD)
    assert plan.pages(Direction.DEMOTE) == 25 and plan.batches[0].pfns.max() < 30


def test_by_default_cold_pages_stay_while_the_fast_node_has_room() -> None:
    """Demote for a reason: a cold page leaves only when its room is needed."""
    heat, marks = arrays()
    put(heat, marks, range(0, 30), 0, mark(h.COLD))
    put(heat, marks, range(40, 60), 40, mark(h.WARM))
    assert policy.decide(heat, marks, two_nodes(free0=500), budget_pages=100).batches == ()
    # Room needed (free 5 below a headroom of 10) for a hot page waiting: exactly
    # that much goes down.
    hot_waiting(heat, marks, range(100, 200))
    plan = policy.decide(heat, marks, two_nodes(free0=5, keep0=10), budget_pages=100,
                         params=TWO_ROUNDS)
    assert plan.pages(Direction.DEMOTE) == 5 and plan.pages(Direction.PROMOTE) == 0


def test_the_headroom_is_made_only_for_hot_pages_waiting_below() -> None:
    """Below its headroom, even below its watermark, a node whose hot pages are all on
    it keeps every page (a workload that fits loses nothing to tierd; the kernel's
    reclaim keeps the watermark); once hot pages wait below, the headroom is restored
    for them."""
    heat, marks = arrays()
    put(heat, marks, range(0, 50), 0, mark(h.COLD))
    put(heat, marks, range(50, 100), 40, mark(h.WARM))
    nodes = two_nodes(free0=6, keep0=10)
    assert policy.decide(heat, marks, nodes, budget_pages=100).batches == ()
    assert policy.decide(heat, marks, two_nodes(free0=0, keep0=10),
                         budget_pages=100).batches == ()
    put(heat, marks, range(100, 102), 200, mark(h.HOT))
    plan = policy.decide(heat, marks, nodes, budget_pages=100)
    # 2 of the headroom back for the 2 hot pages waiting, 2 in exchange for them.
    assert [(b.direction, b.pfns.size) for b in plan.batches] == [
        (Direction.DEMOTE, 4), (Direction.PROMOTE, 2)]
    put(heat, marks, range(102, 120), 200, mark(h.HOT))
    plan = policy.decide(heat, marks, nodes, budget_pages=100)
    # 20 waiting: the whole headroom (4) back, and 20 in exchange.
    assert [(b.direction, b.pfns.size) for b in plan.batches] == [
        (Direction.DEMOTE, 24), (Direction.PROMOTE, 20)]


def test_promotions_may_take_the_room_their_exchange_made_below_the_headroom() -> None:
    """A deficit larger than the pages waiting comes back one page per page waiting; the
    pages demoted in exchange are the promotions' room, though the headroom is not yet
    whole: a floor at keep_free would hold every promotion back for intervals."""
    heat, marks = arrays()
    put(heat, marks, range(0, 50), 0, mark(h.COLD))
    put(heat, marks, range(100, 102), 200, mark(h.HOT))
    plan = policy.decide(heat, marks, two_nodes(free0=1, keep0=10), budget_pages=100)
    assert [(b.direction, b.pfns.size) for b in plan.batches] == [
        (Direction.DEMOTE, 4), (Direction.PROMOTE, 2)]
    # 2 of the deficit back: the node keeps 1 + 2 free, and the 2 exchanged are room.
    assert plan.promotion_floor == {0: 3}
    assert policy.decide(heat, marks, two_nodes(free0=20, keep0=10),
                         budget_pages=100).promotion_floor == {0: 10}


def test_a_page_hot_for_one_round_takes_free_room_but_displaces_nothing() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 50), 0, mark(h.COLD))
    put(heat, marks, range(100, 110), 64, mark(h.HOT, streak=1))  # hot for one round
    plan = policy.decide(heat, marks, two_nodes(free0=14, keep0=10), budget_pages=100,
                         params=TWO_ROUNDS)
    assert [(b.direction, b.pfns.size) for b in plan.batches] == [(Direction.PROMOTE, 4)]
    plan = policy.decide(heat, marks, two_nodes(free0=10, keep0=10), budget_pages=100,
                         params=TWO_ROUNDS)
    assert plan.batches == ()  # no room: an exchange waits for the hysteresis
    put(heat, marks, range(100, 110), 64, mark(h.HOT, streak=2))
    plan = policy.decide(heat, marks, two_nodes(free0=10, keep0=10), budget_pages=100,
                         params=TWO_ROUNDS)
    assert [(b.direction, b.pfns.size) for b in plan.batches] == [
        (Direction.DEMOTE, 10), (Direction.PROMOTE, 10)]


def test_by_default_a_page_hot_for_one_round_displaces_a_cold_one() -> None:
    """The first round with evidence acts: heat already holds a once-hot page above the
    cold threshold for three rounds, so only a page idle that long is displaced."""
    heat, marks = arrays()
    put(heat, marks, range(0, 50), 0, mark(h.COLD))
    put(heat, marks, range(50, 60), 16, mark(h.WARM))  # seen accessed a round ago
    put(heat, marks, range(100, 110), 64, mark(h.HOT, streak=1))
    plan = policy.decide(heat, marks, two_nodes(free0=10, keep0=10), budget_pages=100)
    assert [(b.direction, b.pfns.size) for b in plan.batches] == [
        (Direction.DEMOTE, 10), (Direction.PROMOTE, 10)]
    demoted = next(b for b in plan.batches if b.direction is Direction.DEMOTE)
    assert demoted.pfns.max() < 50


def test_lukewarm_pages_of_a_long_tail_stay_below() -> None:
    """Warm pages never displace anything, and never move up on their own."""
    heat, marks = arrays()
    put(heat, marks, range(0, 100), 0, mark(h.COLD))
    put(heat, marks, range(100, 200), 40, mark(h.WARM))
    for free0 in (10, 60):
        assert policy.decide(heat, marks, two_nodes(free0=free0, keep0=10),
                             budget_pages=100).batches == ()


def test_a_direction_without_work_leaves_its_budget_to_the_other() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 100), 0, mark(h.COLD))
    hot_waiting(heat, marks, range(100, 200))
    plan = policy.decide(heat, marks, two_nodes(free0=0, keep0=30), budget_pages=20,
                         params=TWO_ROUNDS)
    assert plan.pages(Direction.DEMOTE) == 20 and plan.deferred_pages == 10


def test_demotion_stops_at_the_target_nodes_own_headroom() -> None:
    heat, marks = arrays()
    put(heat, marks, range(0, 100), 0, mark(h.COLD))
    hot_waiting(heat, marks, range(100, 200))
    plan = policy.decide(heat, marks, two_nodes(free0=0, keep0=30, free1=15, keep1=10),
                         budget_pages=100, params=TWO_ROUNDS)
    assert plan.pages(Direction.DEMOTE) == 5


def test_three_tiers_move_one_tier_at_a_time_demotions_first_sorted_by_target() -> None:
    heat, marks = arrays(300)
    put(heat, marks, range(0, 100), 0, mark(h.COLD))  # node 0, full
    put(heat, marks, range(100, 200), 0, mark(h.COLD))  # node 1, full
    put(heat, marks, range(200, 205), 200, mark(h.HOT))  # node 2: hot pages

    def nodes(free1: int) -> list[NodeTarget]:
        return [NodeTarget(0, 0, ((0, 100),), 0, 2, None, 1),
                NodeTarget(1, 1, ((100, 200),), free1, 2, 0, 2),
                NodeTarget(2, 2, ((200, 300),), 500, 2, 1, None)]

    plan = policy.decide(heat, marks, nodes(free1=0), budget_pages=100,
                         params=PRESSURE_ONLY)
    summary = [(b.direction, b.source, b.target, b.pfns.size) for b in plan.batches]
    # Node 1 has no room for node 0's cold pages yet: it first makes its own
    # (2 to get above its headroom, 5 to exchange for node 2's hot pages).
    assert summary == [(Direction.DEMOTE, 1, 2, 7), (Direction.PROMOTE, 2, 1, 5)]
    plan = policy.decide(heat, marks, nodes(free1=6), budget_pages=100,
                         params=PRESSURE_ONLY)
    summary = [(b.direction, b.source, b.target, b.pfns.size) for b in plan.batches]
    # Node 0 has no free page but nothing waits below it: it keeps its pages.
    assert summary == [(Direction.DEMOTE, 1, 2, 1), (Direction.PROMOTE, 2, 1, 5)]


def test_estimated_histograms_still_pick_exactly_k_coldest(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(policy, "EXACT_HISTOGRAM_PFNS", 7)
    rng = np.random.default_rng(3)
    heat, marks = arrays()
    heat[:100] = rng.integers(0, 9, 100)
    marks[:100] = mark(h.COLD)
    hot_waiting(heat, marks, range(100, 200))  # enough for the sample to see
    plan = policy.decide(heat, marks, two_nodes(free0=0, keep0=25), budget_pages=100,
                         params=TWO_ROUNDS)
    chosen = plan.batches[0].pfns.astype(int)
    assert chosen.size == 25
    assert heat[chosen].max() <= np.sort(heat[:100])[24]


def test_random_demotions_are_the_k_coldest_eligible_pages() -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        heat, marks = arrays()
        heat[:] = rng.integers(0, 256, 200)
        marks[:] = rng.integers(0, 256, 200)
        hot_waiting(heat, marks, range(100, 200))  # more than any k: the whole deficit goes
        k = int(rng.integers(1, 60))
        plan = policy.decide(heat, marks, two_nodes(free0=0, keep0=k, free1=10_000),
                             budget_pages=1000,
                             params=TWO_ROUNDS)
        demoted = [b for b in plan.batches if b.direction is Direction.DEMOTE]
        cls, cd = h.classes(marks[:100]), h.cooldowns(marks[:100])
        settled = h.streaks(marks[:100]) >= TWO_ROUNDS.hysteresis_rounds
        settled_cold = (cls == h.COLD) & (cd == 0) & settled
        movable = (cd == 0) & ((cls == h.COLD) | (cls == h.WARM))
        pfns = demoted[0].pfns.astype(int) if demoted else np.zeros(0, int)
        assert pfns.size == min(k, int(movable.sum()))
        assert movable[pfns].all()
        if pfns.size <= settled_cold.sum():
            assert settled_cold[pfns].all()
            assert heat[pfns].max(initial=0) <= np.sort(heat[:100][settled_cold])[pfns.size - 1]


def test_targets_add_headroom_and_pick_the_roomiest_neighbour_one_tier_away() -> None:
    facts = [policy.NodeFacts(0, 0, ((0, 100),), 1000, 50, 20),
             policy.NodeFacts(1, 1, ((100, 200),), 1000, 300, 20),
             policy.NodeFacts(2, 1, ((200, 300),), 1000, 700, 20),
             policy.NodeFacts(3, 2, ((300, 400),), 1000, 10, 20)]
    by_node = {t.node: t for t in policy.targets(facts, headroom_percent=5.0)}
    assert by_node[0].keep_free_pages == 20 + 50
    assert (by_node[0].promote_to, by_node[0].demote_to) == (None, 2)
    assert (by_node[1].promote_to, by_node[1].demote_to) == (0, 3)
    assert (by_node[3].promote_to, by_node[3].demote_to) == (2, None)


@pytest.mark.parametrize("hysteresis", range(9))
def test_category_membership_is_exactly_the_mark_ranges(hysteresis: int) -> None:
    """One uint8 compare a range (the difference wraps below the range): every mark value."""
    marks = np.arange(256, dtype=np.uint8)
    for category in (policy.COLD_SETTLED, policy.NOT_HOT, policy.HOT_SETTLED, policy.HOT_FRESH):
        ranges = policy.mark_ranges(category, hysteresis)
        expected = np.zeros(256, dtype=np.bool_)
        for low, high in ranges:
            expected |= (marks >= low) & (marks <= high)
        assert (policy._in_category(marks, ranges) == expected).all(), category
        never = PolicyParams(hysteresis_rounds=hysteresis, settle_units=h.HEAT_MAX + 1)
        zero = np.zeros(256, dtype=np.uint8)
        assert (policy._members(category, zero, marks, never) == expected).all(), category
