"""DAMON vaddr evidence: process regions clipped to mappings, pages turned into PFN runs."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lab.workload import Workload
from tierd import heat as h
from tierd.collectors.damon import ProcessDamonCollector, _clip, _page_batch
from tierd.collectors.evidence import RegionBatch
from tierd.collectors.processes import Exclusions, ProcessFilter
from tierd.kernel import damon_sysfs, pagemap
from tierd.kernel.damon_sysfs import MonitoringAttrs
from tierd.kernel.pagemap import PAGE_SIZE, Mapping


def _u64(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64)


def _u32(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint32)


def _mapping(start_page: int, end_page: int) -> Mapping:
    return Mapping(start_page * PAGE_SIZE, end_page * PAGE_SIZE, "rw-p", 0, 0, "")


def test_regions_are_clipped_to_the_mappings_they_overlap() -> None:
    starts, ends = _u64([0, 10 * PAGE_SIZE]), _u64([10 * PAGE_SIZE, 100 * PAGE_SIZE])
    maps = [_mapping(2, 4), _mapping(8, 12), _mapping(200, 210)]
    assert _clip(starts, ends, maps) == [
        (2 * PAGE_SIZE, 4 * PAGE_SIZE, 0),
        (8 * PAGE_SIZE, 10 * PAGE_SIZE, 0), (10 * PAGE_SIZE, 12 * PAGE_SIZE, 1)]


def test_pages_become_sorted_pfn_runs_of_equal_counts() -> None:
    first = (_u64([7, 5, 6, 9]), _u32([3, 3, 3, 3]), _u32([1, 1, 1, 1]))
    second = (_u64([10, 11, 20]), _u32([3, 0, 0]), _u32([1, 2, 2]))
    batch = _page_batch([first, second], max_nr_accesses=20)
    assert batch.pfn_start.tolist() == [5, 9, 11, 20]
    assert batch.pfn_end.tolist() == [8, 11, 12, 21]
    assert batch.nr_accesses.tolist() == [3, 3, 0, 0]
    assert batch.age.tolist() == [1, 1, 2, 2]
    assert batch.max_nr_accesses == 20


def test_no_pages_make_an_empty_batch() -> None:
    batch = _page_batch([], max_nr_accesses=20)
    assert batch.pfn_start.size == 0 and batch.nr_accesses.dtype == np.uint32


def test_short_and_long_regions_heat_the_same_as_one_slice_each() -> None:
    rng = np.random.default_rng(3)
    npfns = 4000
    starts = np.sort(rng.choice(npfns - 200, 60, replace=False)).astype(np.uint64)
    lengths = rng.integers(1, 150, starts.size).astype(np.uint64)
    ends = np.minimum(starts + lengths, np.append(starts[1:], npfns))  # DAMON's never overlap
    batch = RegionBatch(starts, ends.astype(np.uint64),
                        rng.integers(0, 20, starts.size).astype(np.uint32),
                        np.zeros(starts.size, dtype=np.uint32), max_nr_accesses=20,
                        collected_at=0.0)
    model = h.HeatModel(npfns)
    model.heat[:] = rng.integers(0, 256, npfns)
    want = model.heat.astype(np.int64)
    params = model.params
    for start, end, accesses in zip(batch.pfn_start, batch.pfn_end, batch.nr_accesses,
                                    strict=True):
        strength = min(1.0, accesses / 20 / params.region_hot_rate)
        want[start:end] += round(strength * params.units(params.region_weight))
    model.add_regions(batch)
    assert model.heat.tolist() == np.minimum(want, h.HEAT_MAX).tolist()


@pytest.mark.vm
def test_vaddr_regions_find_a_processs_touched_set_hot_and_untouched_set_cold() -> None:
    workload = Workload.start("32M", "32M", start_node=None)
    try:
        state = workload.state()
        hot_pfns, cold_pfns = (pagemap.pfns_of(workload.pid, workload.region_addresses(which))
                               for which in ("hot", "cold"))
        assert (hot_pfns != 0).all() and (cold_pfns != 0).all(), state
        collector = ProcessDamonCollector(ProcessFilter(Exclusions()),
                                          MonitoringAttrs(sample_us=10_000, aggr_us=200_000))
        assert collector.start(), collector.health.reason
        try:
            hot, cold = _accessed_shares(collector, hot_pfns, cold_pfns)
        finally:
            collector.stop()
        assert damon_sysfs.running_kdamonds() == []
        assert hot >= 0.95 and cold <= 0.05, f"hot set {hot:.1%} accessed, cold set {cold:.1%}"
    finally:
        assert workload.stop()


def _accessed_shares(collector: ProcessDamonCollector, hot_pfns: np.ndarray,
                     cold_pfns: np.ndarray, timeout: float = 60) -> tuple[float, float]:
    """Shares of each set's pages in regions with accesses, once regions have split
    around the sets (how many aggregations that takes varies with the emulation's speed)."""
    deadline = time.monotonic() + timeout
    while True:
        batch = collector.collect()
        assert batch is not None, collector.health.reason
        model = h.HeatModel(int(max(hot_pfns.max(), cold_pfns.max())) + 1)
        model.add_regions(batch)
        hot, cold = (float(np.mean(model.heat[pfns.astype(np.intp)] > 0))
                     for pfns in (hot_pfns, cold_pfns))
        if (hot >= 0.95 and cold <= 0.05) or time.monotonic() > deadline:
            return hot, cold
