"""The lab workload: placement reporting, hot/cold swap, content verdict."""

from __future__ import annotations

import numpy as np
import pytest

from lab.workload import Region, Workload, pattern
from tierd.kernel.numa import move_pages


def test_region_detects_a_changed_word() -> None:
    region = Region(1 << 20, 0)
    assert region.intact()
    region.words[12345] ^= np.uint64(1)
    assert not region.intact()


def test_regions_hold_distinct_patterns() -> None:
    assert not np.array_equal(pattern(0, 64), pattern(64, 64))


@pytest.mark.vm
def test_workload_reports_placement_swaps_and_stays_intact() -> None:
    wl = Workload.start("16M", "32M", start_node=1)
    try:
        first = wl.placement()
        # Preferred node 1 has room: everything starts on the slow node.
        assert first.hot_on_fast == 0.0 and first.cold_on_slow == 1.0
        hot_before = wl.region_addresses("hot")
        move_pages(wl.pid, hot_before, np.zeros(hot_before.size))
        assert wl.placement().hot_on_fast == 1.0
        wl.swap()
        assert np.array_equal(wl.region_addresses("cold"), hot_before)
        after = wl.placement()
        assert after.hot_on_fast == 0.0 and after.cold_on_slow == 0.0
    finally:
        assert wl.stop()
