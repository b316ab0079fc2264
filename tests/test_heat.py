"""The heat model: evidence in, two bytes per PFN out, classes with hysteresis."""

from __future__ import annotations

import numpy as np
import pytest

from tierd import heat as h
from tierd.collectors.evidence import UNTRACKED, IdleScan, RegionBatch, SampleBatch

PARAMS = h.HeatParams(decay=0.5, hot_threshold=4.0, cold_threshold=0.5, idle_access_weight=4.0,
                      sample_weight=1.0, region_weight=8.0, region_hot_rate=1.0,
                      initial_heat=2.0,
                      cooldown_rounds=2)


def _scan(ages: list[int], start: int = 0) -> IdleScan:
    return IdleScan(start, np.array(ages, dtype=np.uint8), 0.0)


def _interval(model: h.HeatModel, *evidence: object) -> None:
    model.decay()
    for e in evidence:
        if isinstance(e, IdleScan):
            list(model.add_idle_scan(e))
        elif isinstance(e, SampleBatch):
            model.add_samples(e)
        else:
            model.add_regions(e)
    model.classify()


def test_class_counts_cover_a_range_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h, "PASS_CHUNK", 7)  # ranges that span several chunks
    model = h.HeatModel(40, PARAMS)
    model.mark[3:10] = h._pack(h.HOT, 1, 0)
    model.mark[10:12] = h._pack(h.WARM, 0, 2)
    model.mark[12:30] = h._pack(h.COLD, 7, 0)
    model.mark[30] = h.PINNED
    assert model.class_counts(0, 40) == (18, 2, 7)
    assert model.class_counts(5, 13) == (1, 2, 5)
    assert model.class_counts(30, 100) == (0, 0, 0)  # pinned is not tracked; past the end


def test_two_bytes_per_pfn() -> None:
    assert h.HeatModel(1000).nbytes == 2000


def test_idle_scan_tracks_lru_pages_and_heats_accessed_ones() -> None:
    model = h.HeatModel(8, PARAMS)
    _interval(model, _scan([0, 3, UNTRACKED, 0], start=2))
    assert model.heat.tolist() == [0, 0, 32 + 64, 32, 0, 32 + 64, 0, 0]
    cls = h.classes(model.mark)
    assert cls.tolist() == [0, 0, h.HOT, h.WARM, 0, h.HOT, 0, 0]
    assert model.tracked_count() == 3


def test_a_page_no_longer_on_the_lru_becomes_untracked() -> None:
    model = h.HeatModel(4, PARAMS)
    _interval(model, _scan([0, 0, 0, 0]))
    _interval(model, _scan([0, UNTRACKED, 0, 0]))
    assert h.classes(model.mark).tolist() == [h.HOT, 0, h.HOT, h.HOT]
    assert model.heat[1] == 0


def test_decay_cools_an_idle_page_to_cold_and_streaks_count_intervals() -> None:
    model = h.HeatModel(2, PARAMS)
    _interval(model, _scan([0, 0]))  # 2 + 4 accesses -> 6.0: hot
    seen = []
    for _ in range(5):
        _interval(model, _scan([0, 1]))
        seen.append((int(model.heat[1]), int(h.classes(model.mark)[1]),
                     int(h.streaks(model.mark)[1])))
    # 6.0 -> 3.0 (warm) -> 1.5 -> 0.75 -> 0.375 (cold) -> 0.1875 (cold)
    assert seen == [(48, h.WARM, 1), (24, h.WARM, 2), (12, h.WARM, 3), (6, h.COLD, 1),
                    (3, h.COLD, 2)]
    assert h.classes(model.mark)[0] == h.HOT and h.streaks(model.mark)[0] == 6


def test_streak_saturates_and_cooldown_counts_down_to_zero() -> None:
    model = h.HeatModel(1, PARAMS)
    model.track(np.array([0], dtype=np.uint64))
    assert h.cooldowns(model.mark)[0] == h.NEW_PAGE_COOLDOWN
    model.cool_down(np.array([0], dtype=np.uint64))
    assert h.cooldowns(model.mark)[0] == 2
    cooldowns = []
    for _ in range(10):
        _interval(model, _scan([0]))
        cooldowns.append(int(h.cooldowns(model.mark)[0]))
    assert cooldowns[:3] == [1, 0, 0]
    assert h.streaks(model.mark)[0] == h.STREAK_MAX


def test_samples_add_per_sample_and_saturate() -> None:
    model = h.HeatModel(4, PARAMS)
    pfns = np.array([1, 1, 1, 3] + [2] * 300, dtype=np.uint64)
    _interval(model, SampleBatch(pfns, lost=0, unresolved=0, collected_at=0.0))
    assert model.heat.tolist() == [0, 32 + 48, 255, 32 + 16]
    assert h.classes(model.mark).tolist() == [0, h.HOT, h.HOT, h.WARM]


def test_samples_beyond_the_model_are_dropped_not_fatal() -> None:
    model = h.HeatModel(4, PARAMS)
    model.add_samples(SampleBatch(np.array([2, 1 << 40], dtype=np.uint64), 0, 0, 0.0))
    assert model.tracked_count() == 1


def test_regions_heat_by_access_rate_without_tracking_free_frames() -> None:
    model = h.HeatModel(10, PARAMS)
    model.track(np.array([1, 6], dtype=np.uint64))
    batch = RegionBatch(np.array([0, 5], dtype=np.uint64), np.array([5, 10], dtype=np.uint64),
                        np.array([20, 5], dtype=np.uint32), np.array([1, 1], dtype=np.uint32),
                        max_nr_accesses=20, collected_at=0.0)
    model.decay()
    model.add_regions(batch)
    assert model.heat.tolist() == [128, 16 + 128, 128, 128, 128, 32, 16 + 32, 32, 32, 32]
    assert model.tracked_count() == 2


def test_pinned_frames_are_not_candidates_and_not_retracked_until_unpinned() -> None:
    model = h.HeatModel(4, PARAMS)
    _interval(model, _scan([0, 0, 0, 0]))
    model.pin(np.array([1, 2], dtype=np.uint64))
    _interval(model, _scan([0, 0, 0, 0]))
    model.track(np.array([1], dtype=np.uint64))
    assert h.classes(model.mark).tolist() == [h.HOT, 0, 0, h.HOT]
    assert model.mark[1] == h.PINNED and model.mark[2] == h.PINNED
    model.unpin_all()
    _interval(model, _scan([0, 0, 0, 0]))
    assert h.classes(model.mark).tolist() == [h.HOT, h.HOT, h.HOT, h.HOT]


def test_a_few_percent_damon_access_rate_already_counts_as_hot() -> None:
    model = h.HeatModel(4, h.HeatParams())
    batch = RegionBatch(np.array([0, 2], dtype=np.uint64), np.array([2, 4], dtype=np.uint64),
                        np.array([1, 0], dtype=np.uint32), np.array([1, 1], dtype=np.uint32),
                        max_nr_accesses=50, collected_at=0.0)
    model.add_regions(batch)
    assert model.heat.tolist() == [64, 64, 0, 0]


def test_transfer_moves_heat_to_the_new_frame_with_a_cooldown() -> None:
    model = h.HeatModel(8, PARAMS)
    _interval(model, _scan([0, 0, 0, 0, 0, 0, 0, 0]))
    _interval(model, _scan([0, 0, 0, 0, 0, 0, 0, 0]))
    model.heat[5] = 0
    model.mark[5] = 0
    model.transfer(np.array([1], dtype=np.uint64), np.array([5], dtype=np.uint64))
    assert model.mark[1] == 0 and model.heat[1] == 0
    assert h.classes(model.mark)[5] == h.HOT and h.cooldowns(model.mark)[5] == 2
    assert model.heat[5] > 0


def test_vacate_and_cool_down() -> None:
    model = h.HeatModel(4, PARAMS)
    _interval(model, _scan([0, 0, 0, 0]))
    _interval(model, _scan([0, 0, 0, 0]))
    _interval(model, _scan([0, 0, 0, 0]))
    model.vacate(np.array([0], dtype=np.uint64))
    model.cool_down(np.array([2], dtype=np.uint64))
    assert h.classes(model.mark).tolist() == [0, h.HOT, h.HOT, h.HOT]
    assert h.cooldowns(model.mark).tolist() == [0, 0, 2, 0]


@pytest.mark.parametrize("advance", [True, False])
def test_classify_matches_a_per_page_reference_on_random_marks(advance: bool) -> None:
    rng = np.random.default_rng(5)
    model = h.HeatModel(5000, PARAMS)
    model.heat[:] = rng.integers(0, 256, 5000)
    model.mark[:] = rng.integers(0, 256, 5000)
    before_heat, before_mark = model.heat.copy(), model.mark.copy()
    model.classify(advance=advance)
    for heat, mark, got in zip(before_heat, before_mark, model.mark, strict=True):
        assert got == _reference_classify(int(heat), int(mark), int(advance))


def _reference_classify(heat: int, mark: int, advance: int) -> int:
    old_cls = (mark >> 3) & 3
    if old_cls == 0:
        return mark  # untracked (0) or pinned
    cls = h.HOT if heat >= 64 else h.COLD if heat <= 8 else h.WARM
    streak = min(mark & 7, 7 - advance) + advance if cls == old_cls else 1
    cooldown = max(0, (mark >> 5) - advance)
    return (cooldown << 5) | (cls << 3) | streak


def _random_model(seed: int, n: int = 5000) -> h.HeatModel:
    """Random heat and marks, classified as fold() leaves them."""
    rng = np.random.default_rng(seed)
    model = h.HeatModel(n, PARAMS)
    model.heat[:] = rng.integers(0, 256, n)
    model.mark[:] = rng.integers(0, 256, n)
    model.classify()
    return model


def test_a_fold_within_a_round_classifies_as_a_full_pass_would(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h, "PASS_CHUNK", 64)  # evidence spanning several chunks
    rng = np.random.default_rng(9)
    model, reference = _random_model(8), _random_model(8)
    scan = _scan(rng.choice([0, 1, 2, UNTRACKED], 700).tolist(), start=1000)
    samples = SampleBatch(rng.integers(0, 5100, 300).astype(np.uint64), 0, 0, 0.0)
    model.fold([scan], [samples], new_round=False)
    list(reference.add_idle_scan(scan))
    reference.add_samples(samples)
    reference.classify(advance=False)
    assert np.array_equal(model.heat, reference.heat)
    assert np.array_equal(model.mark, reference.mark)


def test_a_fold_within_a_round_with_regions_classifies_every_pfn() -> None:
    """A DAMON region may heat any PFN: its interval reclassifies the whole host."""
    model, reference = _random_model(6), _random_model(6)
    model.heat[:] = reference.heat[:] = 0  # classes now disagree with heat everywhere
    regions = RegionBatch(np.array([100], dtype=np.uint64), np.array([200], dtype=np.uint64),
                          np.array([5], dtype=np.uint32), np.array([1], dtype=np.uint32),
                          max_nr_accesses=5, collected_at=0.0)
    model.fold(regions=[regions, regions], new_round=False)
    reference.add_regions(regions)
    reference.add_regions(regions)
    reference.classify(advance=False)
    assert np.array_equal(model.heat, reference.heat)
    assert np.array_equal(model.mark, reference.mark)


def test_a_fold_within_a_round_leaves_pages_without_evidence_alone() -> None:
    """Only where evidence landed is heat reclassified: a pass over the rest of the host
    would change nothing there, and its cost grows with memory, not with evidence."""
    model = _random_model(4)
    model.heat[:] = 0  # every class now disagrees with its heat, unseen by fold
    before = model.mark.copy()
    samples = SampleBatch(np.array([10, 20], dtype=np.uint64), 0, 0, 0.0)
    model.fold([_scan([1] * 100, start=3000)], [samples], new_round=False)
    changed = np.flatnonzero(model.mark != before)
    assert set(changed.tolist()) <= {10, 20, *range(3000, 3100)}
    assert changed.size > 0


def test_heat_and_streaks_age_per_round_not_per_interval() -> None:
    """A 30 s idle scan with a 5 s interval: the scan's evidence holds until the next scan."""
    model = h.HeatModel(2, h.HeatParams(cooldown_rounds=3))
    model.fold()  # the first round found nothing: the pages below are new
    model.fold([_scan([0, 1])])  # round 2: page 0 accessed (hot), page 1 idle (cold)
    for _ in range(5):  # intervals without a scan
        model.fold(new_round=False)
    assert model.heat.tolist() == [64, 0]
    assert h.classes(model.mark).tolist() == [h.HOT, h.COLD]
    assert h.streaks(model.mark).tolist() == [1, 1]
    assert h.cooldowns(model.mark).tolist() == [h.NEW_PAGE_COOLDOWN - 1] * 2
    model.fold([_scan([0, 1])])  # round 3: both settled, both free to move
    assert model.heat.tolist() == [32 + 64, 0]
    assert h.streaks(model.mark).tolist() == [2, 2]
    assert h.cooldowns(model.mark).tolist() == [0, 0]


def test_the_first_rounds_pages_predate_tierd_and_sit_out_no_cooldown() -> None:
    """At start every page is new to tierd, not new: its first round is evidence enough
    for free room; a page first seen in a later round still sits out its cooldown."""
    model = h.HeatModel(3, h.HeatParams())
    model.fold([_scan([0, 1, UNTRACKED])])
    assert h.classes(model.mark).tolist() == [h.HOT, h.COLD, 0]
    assert h.cooldowns(model.mark).tolist() == [0, 0, 0]
    model.fold([_scan([0, 1, 0])])  # page 2 appears in round 2: new
    assert h.cooldowns(model.mark).tolist() == [0, 0, h.NEW_PAGE_COOLDOWN - 1]
    model.track(np.array([1, 2], dtype=np.uint64))  # tracking again changes nothing
    assert h.cooldowns(model.mark).tolist() == [0, 0, h.NEW_PAGE_COOLDOWN - 1]


def test_only_pages_the_first_rounds_fold_finds_skip_the_cooldown() -> None:
    model = h.HeatModel(2, h.HeatParams())
    model.fold(new_round=False)  # an interval, not a round: the first round is still ahead
    model.fold([_scan([UNTRACKED, 1])])
    assert h.cooldowns(model.mark).tolist() == [0, 0]
    model.track(np.array([0], dtype=np.uint64))  # outside a fold: a new page
    assert h.cooldowns(model.mark).tolist() == [h.NEW_PAGE_COOLDOWN, 0]


def test_idle_evidence_alone_never_reaches_the_heat_that_settles_a_page() -> None:
    """Only evidence that counts accesses within a round (samples, regions) can."""
    model = h.HeatModel(1, h.HeatParams())
    for _ in range(30):
        model.fold([_scan([0])])
    assert model.heat[0] == h.HeatParams().settle_units - 1
    model.fold(samples=[SampleBatch(np.array([0], dtype=np.uint64), lost=0, unresolved=0,
                                    collected_at=0.0)], new_round=False)
    assert model.heat[0] > h.HeatParams().settle_units


def test_samples_between_rounds_add_up_and_can_change_the_class() -> None:
    model = h.HeatModel(1, h.HeatParams())
    model.fold([_scan([1])])
    batch = SampleBatch(np.array([0, 0], dtype=np.uint64), lost=0, unresolved=0,
                        collected_at=0.0)
    model.fold(samples=[batch], new_round=False)
    model.fold(samples=[batch], new_round=False)
    assert model.heat[0] == 4 * h.HEAT_SCALE
    assert h.classes(model.mark)[0] == h.HOT and h.streaks(model.mark)[0] == 1


def test_fold_hands_new_pages_over_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first scan of a large host finds every user page new: never all in one array."""
    monkeypatch.setattr(h, "IDLE_CHUNK", 4)
    model = h.HeatModel(20, PARAMS)
    model.pin(np.array([8], dtype=np.uint64))  # pinned: never new again
    ages = [0, 1, UNTRACKED, 0, 2, 0, UNTRACKED, 1, 0, 0]
    parts: list[list[int]] = []
    model.fold([_scan(ages, start=5)], on_new=lambda pfns: parts.append(pfns.tolist()))
    assert all(0 < len(part) <= 4 for part in parts)
    assert sorted(p for part in parts for p in part) == [5, 6, 9, 10, 12, 13, 14]
    assert model.tracked_count() == 7
