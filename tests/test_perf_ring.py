"""perf_event: attr layout, ring buffer reads with wrap-around, bulk record decoding.

Records are built byte by byte with struct from the layout documented in
include/uapi/linux/perf_event.h (6.12), independently of the decoder's dtype.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

import numpy as np
import pytest

from tierd.kernel import pagemap
from tierd.kernel import perf_event as pe

PAGE = mmap.PAGESIZE

# Sample types of `perf mem record` on the two memory-sampling PMUs.
IBS_OP_TYPE = (pe.SAMPLE_IP | pe.SAMPLE_TID | pe.SAMPLE_TIME | pe.SAMPLE_ADDR | pe.SAMPLE_CPU
               | pe.SAMPLE_PERIOD | pe.SAMPLE_WEIGHT | pe.SAMPLE_DATA_SRC | pe.SAMPLE_PHYS_ADDR)
PEBS_TYPE = (pe.SAMPLE_IDENTIFIER | pe.SAMPLE_IP | pe.SAMPLE_TID | pe.SAMPLE_TIME
             | pe.SAMPLE_ADDR | pe.SAMPLE_ID | pe.SAMPLE_CPU | pe.SAMPLE_PERIOD
             | pe.SAMPLE_WEIGHT_STRUCT | pe.SAMPLE_DATA_SRC | pe.SAMPLE_PHYS_ADDR)


def mem_s(**fields: int) -> int:
    """PERF_MEM_S(): a perf_mem_data_src word from the header's shifts."""
    shifts = {"op": 0, "lvl": 5, "snoop": 19, "lock": 24, "tlb": 26, "lvlnum": 33,
              "remote": 37, "snoopx": 38, "blk": 40, "hops": 43}
    return sum(value << shifts[name] for name, value in fields.items())


# AMD IBS: a load served by local DRAM; a load from CXL memory (mem_lvl_num CXL).
IBS_DRAM = mem_s(op=0x02, lvl=0x02 | 0x80, snoop=0x01, lock=0x01, tlb=0x02 | 0x08, lvlnum=0x0D)
IBS_CXL = mem_s(op=0x02, lvl=0x02, snoop=0x01, tlb=0x02, lvlnum=0x09, remote=1)
# Intel PEBS: an L3 hit, and a load from remote DRAM one hop away.
PEBS_L3 = mem_s(op=0x02, lvl=0x02 | 0x40, snoop=0x02, tlb=0x02 | 0x08, lvlnum=0x03)
PEBS_REMOTE = mem_s(op=0x02, lvl=0x02 | 0x100, snoop=0x02, tlb=0x02, lvlnum=0x0D, remote=1,
                    hops=0x01)


def header(rtype: int, size: int, misc: int = 0) -> bytes:
    return struct.pack("<IHH", rtype, misc, size)


def ibs_record(pid: int, tid: int, addr: int, phys: int, data_src: int, weight: int = 120,
               cpu: int = 1) -> bytes:
    body = struct.pack(
        "<QIIQQIIQQQQ",
        0xFFFFFFFF81000000 + pid,  # ip
        pid, tid,
        123_456_789,  # time
        addr,
        cpu, 0,
        100_000,  # period
        weight,
        data_src,
        phys,
    )
    return header(pe.RECORD_SAMPLE, 8 + len(body)) + body


def pebs_record(pid: int, addr: int, phys: int, data_src: int, latency: int,
                sample_id: int = 77) -> bytes:
    body = struct.pack(
        "<QQIIQQQIIQIHHQQ",
        sample_id,  # identifier
        0x401000,  # ip
        pid, pid,
        987_654_321,  # time
        addr,
        sample_id,  # id
        0, 0,  # cpu, res
        10_007,  # period
        latency, 3, 0,  # weight struct: var1_dw (latency), var2_w, var3_w
        data_src,
        phys,
    )
    return header(pe.RECORD_SAMPLE, 8 + len(body)) + body


def lost_record(lost: int) -> bytes:
    return header(pe.RECORD_LOST, 24) + struct.pack("<QQ", 5, lost)


def throttle_record() -> bytes:
    return header(5, 32) + struct.pack("<QQQ", 1, 5, 6)  # PERF_RECORD_THROTTLE


def test_attr_matches_the_6_12_uapi_layout() -> None:
    attr = pe.PerfEventAttr
    assert ctypes.sizeof(attr) == pe.PERF_ATTR_SIZE_VER8 == 136
    offsets = {name: getattr(attr, name).offset for name in (
        "config", "sample_period", "sample_type", "read_format", "wakeup_events", "bp_type",
        "config1", "config2", "branch_sample_type", "sample_regs_user", "sample_stack_user",
        "clockid", "sample_regs_intr", "aux_watermark", "sample_max_stack", "aux_sample_size",
        "aux_action", "sig_data", "config3")}
    assert offsets == {
        "config": 8, "sample_period": 16, "sample_type": 24, "read_format": 32,
        "wakeup_events": 48, "bp_type": 52, "config1": 56, "config2": 64,
        "branch_sample_type": 72, "sample_regs_user": 80, "sample_stack_user": 88,
        "clockid": 92, "sample_regs_intr": 96, "aux_watermark": 104, "sample_max_stack": 108,
        "aux_sample_size": 112, "aux_action": 116, "sig_data": 120, "config3": 128,
    }


def test_attr_flag_bits_land_where_the_kernel_reads_them() -> None:
    attr = pe.PerfEventAttr()
    attr.disabled = 1
    attr.exclude_hv = 1
    attr.precise_ip = 2
    attr.sample_id_all = 1
    attr.sigtrap = 1
    flags = int.from_bytes(bytes(attr)[40:48], "little")
    assert flags == (1 << 0) | (1 << 6) | (2 << 15) | (1 << 18) | (1 << 37)


def test_mmap_page_control_words_at_1024() -> None:
    assert (pe.DATA_HEAD_OFFSET, pe.DATA_TAIL_OFFSET, pe.DATA_OFFSET_OFFSET,
            pe.DATA_SIZE_OFFSET) == (1024, 1032, 1040, 1048)


def test_sample_dtype_sizes_follow_sample_type() -> None:
    assert pe.sample_dtype(pe.SAMPLE_TID | pe.SAMPLE_ADDR).itemsize == 8 + 8 + 8
    assert pe.sample_dtype(IBS_OP_TYPE).itemsize == len(ibs_record(1, 1, 0, 0, 0))
    assert pe.sample_dtype(PEBS_TYPE).itemsize == len(pebs_record(1, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="variable-size"):
        pe.sample_dtype(pe.SAMPLE_TID | pe.SAMPLE_CALLCHAIN)
    with pytest.raises(ValueError, match="mutually exclusive"):
        pe.sample_dtype(pe.SAMPLE_WEIGHT | pe.SAMPLE_WEIGHT_STRUCT)


def test_decode_ibs_op_records() -> None:
    data = (ibs_record(100, 101, 0x7F0000001008, 0x1_2345_6008, IBS_DRAM)
            + ibs_record(200, 200, 0x7F0000002010, 0x4_0000_1000, IBS_CXL, weight=410, cpu=0))
    decoded = pe.decode(data, IBS_OP_TYPE)
    s = decoded.samples
    assert (decoded.lost, decoded.other) == (0, 0)
    assert s["pid"].tolist() == [100, 200]
    assert s["tid"].tolist() == [101, 200]
    assert s["addr"].tolist() == [0x7F0000001008, 0x7F0000002010]
    assert s["phys_addr"].tolist() == [0x1_2345_6008, 0x4_0000_1000]
    assert s["weight"].tolist() == [120, 410]
    assert s["cpu"].tolist() == [1, 0]
    assert s["period"].tolist() == [100_000, 100_000]
    assert s["data_src"].tolist() == [IBS_DRAM, IBS_CXL]


def test_decode_pebs_records_with_weight_struct() -> None:
    data = pebs_record(300, 0x5000, 0x8000_0040, PEBS_L3, latency=45) + pebs_record(
        301, 0x6008, 0, PEBS_REMOTE, latency=380)
    s = pe.decode(data, PEBS_TYPE).samples
    assert s["identifier"].tolist() == [77, 77]
    assert s["id"].tolist() == [77, 77]
    assert s["weight"].tolist() == [45, 380]
    assert s["weight_var2"].tolist() == [3, 3]
    assert s["addr"].tolist() == [0x5000, 0x6008]
    assert s["phys_addr"].tolist() == [0x8000_0040, 0]


def test_data_src_fields_and_memory_source() -> None:
    words = np.array([IBS_DRAM, IBS_CXL, PEBS_L3, PEBS_REMOTE, 0], dtype=np.uint64)
    fields = pe.decode_data_src(words)
    assert fields["mem_op"].tolist() == [2, 2, 2, 2, 0]
    assert fields["mem_lvl"].tolist() == [0x82, 0x02, 0x42, 0x102, 0]
    assert fields["mem_lvl_num"].tolist() == [0x0D, 0x09, 0x03, 0x0D, 0]
    assert fields["mem_remote"].tolist() == [0, 1, 0, 1, 0]
    assert fields["mem_dtlb"].tolist() == [0x0A, 0x02, 0x0A, 0x02, 0]
    assert fields["mem_snoop"].tolist() == [1, 1, 2, 2, 0]
    assert fields["mem_lock"].tolist() == [1, 0, 0, 0, 0]
    assert fields["mem_hops"].tolist() == [0, 0, 0, 1, 0]
    sources = [pe.SOURCES[i] for i in pe.memory_source(words)]
    assert sources == ["local_ram", "cxl", "cache", "remote_ram", "unknown"]


def test_legacy_mem_lvl_bits_classify_without_lvl_num() -> None:
    local = mem_s(op=0x02, lvl=0x02 | 0x80)
    remote = mem_s(op=0x02, lvl=0x02 | 0x100)
    l1_hit = mem_s(op=0x02, lvl=0x02 | 0x08)
    l3_miss = mem_s(op=0x02, lvl=0x04 | 0x40)
    sources = pe.memory_source(np.array([local, remote, l1_hit, l3_miss], dtype=np.uint64))
    assert [pe.SOURCES[i] for i in sources] == ["local_ram", "remote_ram", "cache", "unknown"]


def test_lost_and_other_records_are_skipped_by_header_size() -> None:
    samples = [ibs_record(i, i, 0x1000 * i, 0x2000 * i, IBS_DRAM) for i in range(1, 300)]
    data = (b"".join(samples[:150]) + lost_record(42) + throttle_record()
            + b"".join(samples[150:200]) + lost_record(8) + b"".join(samples[200:]))
    decoded = pe.decode(data, IBS_OP_TYPE)
    assert decoded.lost == 50
    assert decoded.other == 1
    assert decoded.samples["pid"].tolist() == list(range(1, 300))


def test_lost_samples_record_is_counted() -> None:
    data = header(pe.RECORD_LOST_SAMPLES, 16) + struct.pack("<Q", 9) + ibs_record(
        1, 1, 0x1000, 0x2000, IBS_DRAM)
    decoded = pe.decode(data, IBS_OP_TYPE)
    assert (decoded.lost, decoded.samples.size) == (9, 1)


def test_a_record_of_another_type_with_the_sample_size_is_not_a_sample() -> None:
    size = pe.sample_dtype(pe.SAMPLE_TID | pe.SAMPLE_ADDR).itemsize
    sample = header(pe.RECORD_SAMPLE, size) + struct.pack("<IIQ", 7, 7, 0x7000)
    impostor = header(3, size) + b"x" * (size - 8)  # PERF_RECORD_COMM, same length
    decoded = pe.decode(sample + impostor + sample, pe.SAMPLE_TID | pe.SAMPLE_ADDR)
    assert decoded.samples["addr"].tolist() == [0x7000, 0x7000]
    assert decoded.other == 1


def test_payload_words_that_look_like_headers_do_not_confuse_the_walk() -> None:
    size = len(ibs_record(1, 1, 0, 0, 0))
    fake_header = pe.RECORD_SAMPLE | size << 48  # as a u64: a SAMPLE header of this size
    tricky = ibs_record(7, 7, fake_header, fake_header, IBS_DRAM)
    data = lost_record(1) + tricky * 3 + throttle_record() + tricky
    decoded = pe.decode(data, IBS_OP_TYPE)
    assert decoded.samples["addr"].tolist() == [fake_header] * 4
    assert (decoded.lost, decoded.other) == (1, 1)


def test_corrupt_record_size_is_an_error_not_a_hang() -> None:
    data = ibs_record(1, 1, 0, 0, 0) + header(5, 0) + b"\0" * 24
    with pytest.raises(ValueError, match="corrupt perf record at byte"):
        pe.decode(data, IBS_OP_TYPE)


def test_empty_read_decodes_to_no_samples() -> None:
    decoded = pe.decode(b"", IBS_OP_TYPE)
    assert decoded.samples.size == 0 and decoded.lost == 0


def fake_ring(data_pages: int) -> mmap.mmap:
    """An anonymous mapping laid out like a perf ring: header page, then the data area."""
    buf = mmap.mmap(-1, (1 + data_pages) * PAGE)
    struct.pack_into("<QQ", buf, pe.DATA_OFFSET_OFFSET, PAGE, data_pages * PAGE)
    return buf


def publish(buf: mmap.mmap, head: int, records: bytes) -> int:
    """Write `records` at `head` (wrapping like the kernel) and advance data_head."""
    size = struct.unpack_from("<Q", buf, pe.DATA_SIZE_OFFSET)[0]
    for i, byte in enumerate(records):
        buf[PAGE + (head + i) % size] = byte
    head += len(records)
    struct.pack_into("<Q", buf, pe.DATA_HEAD_OFFSET, head)
    return head


def test_ring_read_wraps_around_and_advances_tail() -> None:
    buf = fake_ring(1)
    ring = pe.PerfRing(buf)
    record = ibs_record(5, 5, 0x5000, 0x9000, IBS_DRAM)
    # Fill almost to the end, read it, then publish records that straddle the end.
    head = publish(buf, 0, record * (PAGE // len(record) - 1))
    first = ring.read()
    assert len(first) == head
    assert struct.unpack_from("<Q", buf, pe.DATA_TAIL_OFFSET)[0] == head
    wrapped = b"".join(ibs_record(i, i, 0x1000 * i, 0, IBS_CXL) for i in range(10))
    head = publish(buf, head, wrapped)
    assert head % PAGE < len(wrapped)  # the new records really wrap
    data = ring.read()
    assert data == wrapped
    assert pe.decode(data, IBS_OP_TYPE).samples["pid"].tolist() == list(range(10))
    assert ring.read() == b""
    ring.close()


def test_ring_read_with_head_and_tail_far_past_the_size() -> None:
    buf = fake_ring(1)
    ring = pe.PerfRing(buf)
    start = 1000 * PAGE + PAGE - 16  # 64-bit positions keep growing; offsets wrap
    struct.pack_into("<QQ", buf, pe.DATA_HEAD_OFFSET, start, start)
    ring = pe.PerfRing(buf)
    records = lost_record(3) + ibs_record(9, 9, 0x9000, 0, IBS_DRAM)
    publish(buf, start, records)
    decoded = pe.decode(ring.read(), IBS_OP_TYPE)
    assert (decoded.lost, decoded.samples["pid"].tolist()) == (3, [9])
    ring.close()


def test_map_refuses_a_ring_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        pe.PerfRing.map(-1, 3)


def test_open_error_names_the_reason() -> None:
    err = pe.PerfOpenError(13, "ibs_op cpu 0")
    assert "perf_event_paranoid" in str(err) and "ibs_op cpu 0" in str(err)
    assert "PMU is gone" in str(pe.PerfOpenError(19, "x"))


# --- the real kernel -------------------------------------------------------------------

FAULT_PAGES = 1000


def open_page_fault_rings(sample_type: int) -> list[tuple[int, pe.PerfRing]]:
    events = []
    for cpu in range(os.cpu_count() or 1):
        attr = pe.PerfEventAttr()
        attr.type = pe.PERF_TYPE_SOFTWARE
        attr.config = pe.PERF_COUNT_SW_PAGE_FAULTS
        attr.sample_period = 1
        attr.sample_type = sample_type
        attr.disabled = 1
        fd = pe.perf_event_open(attr, -1, cpu)
        events.append((fd, pe.PerfRing.map(fd, 64)))
    return events


@pytest.mark.vm
def test_real_ring_holds_every_page_fault_of_a_known_workload() -> None:
    sample_type = pe.SAMPLE_TID | pe.SAMPLE_ADDR | pe.SAMPLE_PHYS_ADDR
    events = open_page_fault_rings(sample_type)
    buf = mmap.mmap(-1, FAULT_PAGES * PAGE)
    buf.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per 4 KiB page
    view = np.frombuffer(buf, dtype=np.uint8)
    base = view.ctypes.data
    try:
        for fd, _ in events:
            pe.enable(fd)
        view[::PAGE] = 1  # first touch of each page: exactly one write fault
        for fd, _ in events:
            pe.disable(fd)
        decoded = [pe.decode(ring.read(), sample_type) for _, ring in events]
        samples = np.concatenate([d.samples for d in decoded])
        ours = samples[(samples["pid"] == os.getpid())
                       & (samples["addr"] >= base) & (samples["addr"] < base + len(buf))]
        assert sum(d.lost for d in decoded) == 0
        pages = np.unique(ours["addr"] >> np.uint64(12))
        assert ours.size == FAULT_PAGES
        assert pages.size == FAULT_PAGES
        # Measured fact: software page-fault samples carry no physical address...
        assert (ours["phys_addr"] == 0).all()
        # ...so the address is resolved through pagemap, where every page now is.
        pfns = pagemap.pfns_of(os.getpid(), ours["addr"])
        assert (pfns != 0).all()
        expected = pagemap.pfns_of(os.getpid(), base + PAGE * np.arange(FAULT_PAGES))
        assert np.array_equal(np.sort(pfns), np.sort(expected))
    finally:
        for fd, ring in events:
            ring.close()
            os.close(fd)


@pytest.mark.vm
def test_real_ring_reports_lost_records_when_it_overflows() -> None:
    sample_type = pe.SAMPLE_TID | pe.SAMPLE_ADDR
    attr = pe.PerfEventAttr()
    attr.type, attr.config, attr.sample_period = (
        pe.PERF_TYPE_SOFTWARE, pe.PERF_COUNT_SW_PAGE_FAULTS, 1)
    attr.sample_type = sample_type
    attr.disabled = 1
    fd = pe.perf_event_open(attr, 0, -1)  # this thread, any CPU
    ring = pe.PerfRing.map(fd, 1)  # 4 KiB: room for 170 records of 24 bytes
    buf = mmap.mmap(-1, (FAULT_PAGES + 1) * PAGE)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(buf, dtype=np.uint8)
    last_page = view.ctypes.data + FAULT_PAGES * PAGE
    try:
        pe.enable(fd)
        view[:FAULT_PAGES * PAGE:PAGE] = 1
        full = pe.decode(ring.read(), sample_type)
        # The kernel writes the LOST record once there is room again: at the next sample.
        view[FAULT_PAGES * PAGE] = 1
        pe.disable(fd)
        after = pe.decode(ring.read(), sample_type)
        assert full.lost == 0
        assert 0 < full.samples.size < FAULT_PAGES
        assert after.lost > 0
        assert full.samples.size + after.lost >= FAULT_PAGES
        assert last_page in after.samples["addr"].tolist()
    finally:
        ring.close()
        os.close(fd)
