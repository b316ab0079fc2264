"""Perf-sample collector: PMU discovery from sysfs, samples to PFNs, the real kernel in the lab."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from tierd.collectors import perf_bcc, perf_samples
from tierd.collectors.perf_samples import (
    PerfSampleCollector,
    online_cpus,
    resolve_through_pagemap,
    samples_to_pfns,
)
from tierd.errors import KernelFileError
from tierd.kernel import pagemap, pmu
from tierd.kernel import perf_event as pe
from tierd.kernel.root import HostRoot
from tierd.vocabulary import State

FIXTURES = Path(__file__).parent / "fixtures" / "perf"
PAGE = mmap.PAGESIZE


def fixture(name: str) -> HostRoot:
    return HostRoot(FIXTURES / name)


def test_amd_zen4_samples_ibs_op_with_l3missonly() -> None:
    event = pmu.memory_event(fixture("amd-zen4"))
    assert (event.kind, event.pmu, event.type) == ("ibs_op", "ibs_op", 11)
    assert event.config["config"] == 1 << 16
    assert "L3 misses only" in event.description
    attr = event.attr()
    assert (attr.type, attr.config, attr.precise_ip, attr.disabled) == (11, 1 << 16, 0, 1)
    assert attr.sample_period == pmu.IBS_OP_PERIOD and attr.sample_period % 16 == 0
    wanted = pe.SAMPLE_ADDR | pe.SAMPLE_TID | pe.SAMPLE_PHYS_ADDR | pe.SAMPLE_DATA_SRC
    assert attr.sample_type & wanted == wanted


def test_amd_zen2_ibs_op_without_l3missonly_samples_every_op() -> None:
    event = pmu.memory_event(fixture("amd-zen2"))
    assert (event.kind, event.type, event.config["config"]) == ("ibs_op", 8, 0)
    assert "L3" not in event.description


def test_intel_pebs_load_latency_raises_the_ldlat_threshold() -> None:
    event = pmu.memory_event(fixture("intel-skx"))
    assert (event.kind, event.pmu, event.type, event.precise_ip) == ("pebs", "cpu", 4, 2)
    assert event.config["config"] == 0xCD | (0x1 << 8)
    assert event.config["config1"] == pmu.PEBS_LDLAT
    attr = event.attr()
    assert (attr.config, attr.config1, attr.precise_ip) == (0x1CD, pmu.PEBS_LDLAT, 2)


def test_companion_unit_files_are_not_events() -> None:
    cpu = pmu.read_pmu("cpu", fixture("intel-skx"))
    assert set(cpu.events) == {"mem-loads", "mem-stores"}


def test_no_memory_sampling_pmu_says_what_was_there() -> None:
    with pytest.raises(pmu.NoMemoryPmu, match=r"no memory-sampling PMU.*software"):
        pmu.memory_event(fixture("no-pmu"))


def test_no_event_source_directory_at_all() -> None:
    with pytest.raises(pmu.NoMemoryPmu, match="event_source/devices is missing"):
        pmu.memory_event(fixture("no-sysfs"))


def test_garbled_pmu_type_names_the_file() -> None:
    with pytest.raises(KernelFileError, match=r"ibs_op/type: not a number: 'eleven'"):
        pmu.memory_event(fixture("garbled"))


def test_raw_event_in_perf_syntax() -> None:
    event = pmu.raw_event("cpu/event=0xd1,umask=0x20/pp", fixture("intel-skx"))
    assert (event.kind, event.type, event.precise_ip) == ("raw", 4, 2)
    assert event.config["config"] == 0x20D1
    named = pmu.memory_event(fixture("intel-skx"), raw="cpu/mem-stores/p")
    assert named.config["config"] == 0xD0 | (0x82 << 8)
    assert named.precise_ip == 1


def test_raw_event_errors_name_the_problem() -> None:
    with pytest.raises(pmu.PmuError, match="no format term 'bogus'"):
        pmu.raw_event("cpu/bogus=1/", fixture("intel-skx"))
    with pytest.raises(pmu.PmuError, match="expected pmu/term"):
        pmu.raw_event("cpu:event=1", fixture("intel-skx"))
    with pytest.raises(pmu.PmuError, match="too wide"):
        pmu.raw_event("cpu/umask=0x1ff/", fixture("intel-skx"))
    with pytest.raises(KernelFileError, match="nosuch/type: missing"):
        pmu.raw_event("nosuch/event=1/", fixture("intel-skx"))


def test_format_with_split_bit_ranges() -> None:
    fmt = pmu.Format.parse("config:0-7,32-35")
    assert fmt.field == "config"
    assert fmt.encode(0x1AB) == 0xAB | (0x1 << 32)
    assert pmu.Format.parse("config1:0-15").encode(30) == 30
    with pytest.raises(ValueError, match="bad format"):
        pmu.Format.parse("cfg:0-7")


def test_online_cpus_from_sysfs() -> None:
    assert online_cpus(fixture("amd-zen4")) == [0, 1, 2, 3]
    with pytest.raises(KernelFileError, match="cpu/online: missing"):
        online_cpus(fixture("no-sysfs"))


def samples(sample_type: int, rows: list[dict[str, int]]) -> np.ndarray:
    out = np.zeros(len(rows), dtype=pe.sample_dtype(sample_type))
    for i, row in enumerate(rows):
        for key, value in row.items():
            out[key][i] = value
    return out


def fake_resolver(table: dict[int, dict[int, int]]):
    """pid -> {vaddr page -> pfn}; an unknown pid has exited."""
    calls: list[int] = []

    def resolve(pid: int, vaddrs: np.ndarray) -> np.ndarray:
        calls.append(pid)
        if pid not in table:
            raise pagemap.ProcessGoneError(f"/proc/{pid}/pagemap", "process gone")
        pages = table[pid]
        return np.array([pages.get(int(v) & ~(PAGE - 1), 0) for v in vaddrs], dtype=np.uint64)

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


SAMPLE = pe.SAMPLE_TID | pe.SAMPLE_ADDR | pe.SAMPLE_PHYS_ADDR


def test_phys_addr_wins_and_zero_phys_goes_through_pagemap() -> None:
    rows = [
        {"pid": 10, "addr": 0x7000_0010, "phys_addr": 0x1234_5678},  # translated by the kernel
        {"pid": 10, "addr": 0x7000_1008, "phys_addr": 0},  # present: resolved
        {"pid": 20, "addr": 0x5000_0000, "phys_addr": 0},  # present in another process
        {"pid": 10, "addr": 0x7000_9000, "phys_addr": 0},  # no longer present
        {"pid": 30, "addr": 0x1000, "phys_addr": 0},  # process gone
        {"pid": 0, "addr": 0xFFFF_8880_0000_0000, "phys_addr": 0},  # kernel thread
    ]
    resolve = fake_resolver({10: {0x7000_1000: 0x777}, 20: {0x5000_0000: 0x888}})
    pfns, unresolved = samples_to_pfns(samples(SAMPLE, rows), resolve)
    assert sorted(pfns.tolist()) == sorted([0x1234_5678 >> 12, 0x777, 0x888])
    assert unresolved == 3
    assert sorted(resolve.calls) == [10, 20, 30]  # one pagemap pass per pid, none for pid 0


def test_without_addr_nothing_can_be_resolved() -> None:
    rows = [{"pid": 1, "phys_addr": 0x5000}, {"pid": 1, "phys_addr": 0}]
    pfns, unresolved = samples_to_pfns(
        samples(pe.SAMPLE_TID | pe.SAMPLE_PHYS_ADDR, rows), fake_resolver({}))
    assert (pfns.tolist(), unresolved) == ([5], 1)


def test_resolution_keeps_sample_order_within_each_pid() -> None:
    pids = np.array([2, 1, 2, 1], dtype=np.uint32)
    addrs = np.array([0x2000, 0x1000, 0x3000, 0x4000], dtype=np.uint64)
    resolve = fake_resolver({1: {0x1000: 11, 0x4000: 14}, 2: {0x2000: 22, 0x3000: 23}})
    assert resolve_through_pagemap(pids, addrs, resolve).tolist() == [22, 11, 23, 14]


# --- the real kernel -------------------------------------------------------------------

FAULT_PAGES = 2000


@pytest.mark.vm
def test_the_lab_guest_has_no_memory_sampling_pmu() -> None:
    with pytest.raises(pmu.NoMemoryPmu, match="no memory-sampling PMU"):
        pmu.memory_event()


@pytest.mark.vm
def test_collector_turns_every_page_fault_into_the_right_pfn() -> None:
    event = pmu.software_page_faults(pe.SAMPLE_TID | pe.SAMPLE_ADDR | pe.SAMPLE_PHYS_ADDR)
    buf = mmap.mmap(-1, FAULT_PAGES * PAGE)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(buf, dtype=np.uint8)
    with PerfSampleCollector(event, online_cpus(), ring_pages=64) as collector:
        assert collector.health.state is State.OK, collector.health.reason
        view[::PAGE] = 1
        batch = collector.collect()
    expected = pagemap.pfns_of(os.getpid(), view.ctypes.data + PAGE * np.arange(FAULT_PAGES))
    assert (expected != 0).all()
    assert batch.lost == 0
    ours = batch.pfns[np.isin(batch.pfns, expected)]
    assert ours.size == FAULT_PAGES  # one sample per fault, none lost, none unresolved
    assert np.array_equal(np.sort(ours), np.sort(expected))
    assert collector.stats.samples >= FAULT_PAGES


@pytest.mark.vm
def test_a_pmu_that_is_gone_leaves_the_collector_disabled_with_the_reason() -> None:
    gone = pmu.MemoryEvent(kind="raw", pmu="ibs_op", type=0x7FFF, config={}, precise_ip=0,
                           sample_period=100_000, sample_type=pmu.MEMORY_SAMPLE_TYPE,
                           description="ibs_op (unplugged)")
    collector = PerfSampleCollector(gone, online_cpus())
    assert not collector.start()
    assert collector.health.state is State.DISABLED
    assert "ibs_op (unplugged), cpu 0" in collector.health.reason
    assert "PMU or event is gone" in collector.health.reason
    assert collector.collect().pfns.size == 0
    collector.close()


@pytest.mark.vm
def test_an_offline_cpu_degrades_but_keeps_the_others() -> None:
    collector = PerfSampleCollector(pmu.software_page_faults(), [0, 63])
    assert collector.start()
    assert collector.health.state is State.DEGRADED
    assert "cpu 63" in collector.health.reason
    collector.close()


@pytest.mark.vm
def test_perf_event_paranoid_denies_an_unprivileged_user() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)  # nobody: no CAP_PERFMON, paranoid 2 forbids CPU-wide events
            collector = PerfSampleCollector(pmu.software_page_faults(), [0])
            started = collector.start()
            os.write(write_end, f"{started}|{collector.health.reason}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        started, reason = f.read().split("|", 1)
    os.waitpid(pid, 0)
    assert started == "False"
    assert "perf_event_paranoid" in reason


# --- the bcc backend and the probes ----------------------------------------------------


def test_bcc_needs_kernel_headers() -> None:
    assert perf_bcc.kernel_headers(fixture("kheaders")) == "/sys/kernel/kheaders.tar.xz"
    reason = perf_bcc.unusable_reason(fixture("no-pmu"))
    assert reason is not None and "CONFIG_IKHEADERS" in reason
    cap = perf_bcc.probe(fixture("no-pmu"))
    assert (cap.name, cap.usable) == ("perf-bcc", False)


def test_bcc_usable_where_the_kernel_carries_its_headers() -> None:
    cap = perf_bcc.probe(fixture("kheaders"))
    assert cap.usable, cap.reason
    assert "kheaders.tar.xz" in cap.reason


def test_bcc_collector_without_headers_is_unavailable_and_says_why() -> None:
    collector = perf_bcc.BccSampleCollector(pmu.software_page_faults(), [0], fixture("no-pmu"))
    assert not collector.start()
    assert collector.health.state is State.DISABLED
    assert collector.health.reason.startswith("bcc backend: no kernel headers")
    assert collector.collect().pfns.size == 0


def test_probe_reports_the_pmu_and_the_paranoid_setting() -> None:
    pmu_cap, events_cap = perf_samples.probe(fixture("amd-zen4"))
    assert (pmu_cap.name, pmu_cap.usable, pmu_cap.reason) == (
        "perf-pmu", True, "AMD IBS op (L3 misses only)")
    assert events_cap.name == "perf-events" and "perf_event_paranoid 2" in events_cap.reason
    none_cap, _ = perf_samples.probe(fixture("no-pmu"))
    assert not none_cap.usable and "no memory-sampling PMU" in none_cap.reason
    garbled, _ = perf_samples.probe(fixture("garbled"))
    assert not garbled.usable and "not a number" in garbled.reason
    _, missing = perf_samples.probe(fixture("no-sysfs"))
    assert not missing.usable and "kernel without perf events" in missing.reason


@pytest.mark.vm(kernels=["tierd"])
def test_bcc_backend_counts_every_page_fault_in_the_kernel() -> None:
    event = pmu.software_page_faults()
    buf = mmap.mmap(-1, FAULT_PAGES * PAGE)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(buf, dtype=np.uint8)
    collector = perf_bcc.perf_collector("bcc", event, online_cpus())
    try:
        assert isinstance(collector, perf_bcc.BccSampleCollector), collector.health.reason
        assert collector.health.state is State.OK, collector.health.reason
        view[::PAGE] = 1
        batch = collector.collect()
        again = collector.collect()  # the map was drained: nothing twice
    finally:
        collector.close()
    expected = pagemap.pfns_of(os.getpid(), view.ctypes.data + PAGE * np.arange(FAULT_PAGES))
    assert batch.lost == 0
    ours = batch.pfns[np.isin(batch.pfns, expected)]
    assert ours.size == FAULT_PAGES
    assert np.array_equal(np.sort(ours), np.sort(expected))
    assert not np.isin(again.pfns, expected).any()


@pytest.mark.vm(kernels=["stock"])
def test_bcc_falls_back_to_the_ctypes_ring_on_the_stock_kernel() -> None:
    collector = perf_bcc.perf_collector("bcc", pmu.software_page_faults(), online_cpus())
    try:
        assert isinstance(collector, PerfSampleCollector)
        assert collector.health.state is State.OK
        assert collector.health.reason.startswith("ctypes ring (bcc backend: no kernel headers")
    finally:
        collector.close()
