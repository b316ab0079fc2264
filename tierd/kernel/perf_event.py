"""perf_event_open(2) from Python: the attr struct, the mmap ring buffer, record decoding.

Layouts follow include/uapi/linux/perf_event.h of Linux 6.12 (x86-64 only:
syscall 298, little-endian). The ring is read the way the kernel documents
it: load `data_head`, read the bytes from our tail up to it (wrapping at the
end of the data area), then store `data_tail`. On x86-64 an aligned 8-byte
load is already an acquire and a store a release (TSO), so plain aligned
ctypes accesses are the correct barriers there.

Records are decoded in bulk: with a fixed, known `sample_type` every
PERF_RECORD_SAMPLE has the same size, so runs of samples are viewed as one
numpy structured array; only other record types (LOST, THROTTLE, ...) are
walked one header at a time, and they are rare.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError, TierdError
from tierd.kernel.root import HOST, HostRoot

SYS_PERF_EVENT_OPEN = 298  # x86_64
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_DISABLE = 0x2401  # _IO('$', 1)
PERF_ATTR_SIZE_VER8 = 136
PARANOID = "/proc/sys/kernel/perf_event_paranoid"

PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_RAW = 4
PERF_COUNT_SW_PAGE_FAULTS = 2

# enum perf_event_sample_format
SAMPLE_IP = 1 << 0
SAMPLE_TID = 1 << 1
SAMPLE_TIME = 1 << 2
SAMPLE_ADDR = 1 << 3
SAMPLE_READ = 1 << 4
SAMPLE_CALLCHAIN = 1 << 5
SAMPLE_ID = 1 << 6
SAMPLE_CPU = 1 << 7
SAMPLE_PERIOD = 1 << 8
SAMPLE_STREAM_ID = 1 << 9
SAMPLE_RAW = 1 << 10
SAMPLE_BRANCH_STACK = 1 << 11
SAMPLE_REGS_USER = 1 << 12
SAMPLE_STACK_USER = 1 << 13
SAMPLE_WEIGHT = 1 << 14
SAMPLE_DATA_SRC = 1 << 15
SAMPLE_IDENTIFIER = 1 << 16
SAMPLE_TRANSACTION = 1 << 17
SAMPLE_REGS_INTR = 1 << 18
SAMPLE_PHYS_ADDR = 1 << 19
SAMPLE_AUX = 1 << 20
SAMPLE_CGROUP = 1 << 21
SAMPLE_DATA_PAGE_SIZE = 1 << 22
SAMPLE_CODE_PAGE_SIZE = 1 << 23
SAMPLE_WEIGHT_STRUCT = 1 << 24

# enum perf_event_type (the ones tierd looks at)
RECORD_LOST = 2
RECORD_SAMPLE = 9
RECORD_LOST_SAMPLES = 13

# PERF_RECORD_SAMPLE fields in the order the kernel writes them
# (perf_output_sample), for the sample_type bits whose size is fixed. Bits
# with variable-size payloads (READ, CALLCHAIN, RAW, BRANCH_STACK, REGS_*,
# STACK_USER, AUX) are refused: tierd never asks for them.
_FIELD_ORDER: tuple[tuple[int, list[tuple[str, str]]], ...] = (
    (SAMPLE_IDENTIFIER, [("identifier", "<u8")]),
    (SAMPLE_IP, [("ip", "<u8")]),
    (SAMPLE_TID, [("pid", "<u4"), ("tid", "<u4")]),
    (SAMPLE_TIME, [("time", "<u8")]),
    (SAMPLE_ADDR, [("addr", "<u8")]),
    (SAMPLE_ID, [("id", "<u8")]),
    (SAMPLE_STREAM_ID, [("stream_id", "<u8")]),
    (SAMPLE_CPU, [("cpu", "<u4"), ("cpu_res", "<u4")]),
    (SAMPLE_PERIOD, [("period", "<u8")]),
    # WEIGHT and WEIGHT_STRUCT share one u64 slot; the struct form splits it.
    (SAMPLE_WEIGHT, [("weight", "<u8")]),
    (SAMPLE_WEIGHT_STRUCT, [("weight", "<u4"), ("weight_var2", "<u2"), ("weight_var3", "<u2")]),
    (SAMPLE_DATA_SRC, [("data_src", "<u8")]),
    (SAMPLE_TRANSACTION, [("transaction", "<u8")]),
    (SAMPLE_PHYS_ADDR, [("phys_addr", "<u8")]),
    (SAMPLE_CGROUP, [("cgroup", "<u8")]),
    (SAMPLE_DATA_PAGE_SIZE, [("data_page_size", "<u8")]),
    (SAMPLE_CODE_PAGE_SIZE, [("code_page_size", "<u8")]),
)
_FIXED_BITS = 0
for _bit, _ in _FIELD_ORDER:
    _FIXED_BITS |= _bit

HEADER_DTYPE = np.dtype([("type", "<u4"), ("misc", "<u2"), ("size", "<u2")])
HEADER_SIZE = HEADER_DTYPE.itemsize


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr, PERF_ATTR_SIZE_VER8 (136 bytes) as in Linux 6.12."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),  # union with sample_freq
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("disabled", ctypes.c_uint64, 1),
        ("inherit", ctypes.c_uint64, 1),
        ("pinned", ctypes.c_uint64, 1),
        ("exclusive", ctypes.c_uint64, 1),
        ("exclude_user", ctypes.c_uint64, 1),
        ("exclude_kernel", ctypes.c_uint64, 1),
        ("exclude_hv", ctypes.c_uint64, 1),
        ("exclude_idle", ctypes.c_uint64, 1),
        ("mmap", ctypes.c_uint64, 1),
        ("comm", ctypes.c_uint64, 1),
        ("freq", ctypes.c_uint64, 1),
        ("inherit_stat", ctypes.c_uint64, 1),
        ("enable_on_exec", ctypes.c_uint64, 1),
        ("task", ctypes.c_uint64, 1),
        ("watermark", ctypes.c_uint64, 1),
        ("precise_ip", ctypes.c_uint64, 2),
        ("mmap_data", ctypes.c_uint64, 1),
        ("sample_id_all", ctypes.c_uint64, 1),
        ("exclude_host", ctypes.c_uint64, 1),
        ("exclude_guest", ctypes.c_uint64, 1),
        ("exclude_callchain_kernel", ctypes.c_uint64, 1),
        ("exclude_callchain_user", ctypes.c_uint64, 1),
        ("mmap2", ctypes.c_uint64, 1),
        ("comm_exec", ctypes.c_uint64, 1),
        ("use_clockid", ctypes.c_uint64, 1),
        ("context_switch", ctypes.c_uint64, 1),
        ("write_backward", ctypes.c_uint64, 1),
        ("namespaces", ctypes.c_uint64, 1),
        ("ksymbol", ctypes.c_uint64, 1),
        ("bpf_event", ctypes.c_uint64, 1),
        ("aux_output", ctypes.c_uint64, 1),
        ("cgroup", ctypes.c_uint64, 1),
        ("text_poke", ctypes.c_uint64, 1),
        ("build_id", ctypes.c_uint64, 1),
        ("inherit_thread", ctypes.c_uint64, 1),
        ("remove_on_exec", ctypes.c_uint64, 1),
        ("sigtrap", ctypes.c_uint64, 1),
        ("reserved_1", ctypes.c_uint64, 26),
        ("wakeup_events", ctypes.c_uint32),  # union with wakeup_watermark
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),  # union with bp_addr
        ("config2", ctypes.c_uint64),  # union with bp_len
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("aux_action", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
        ("config3", ctypes.c_uint64),
    ]


class PerfEventMmapPage(ctypes.Structure):
    """The head of struct perf_event_mmap_page up to the ring's control words."""

    _fields_ = [
        ("version", ctypes.c_uint32),
        ("compat_version", ctypes.c_uint32),
        ("lock", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("offset", ctypes.c_int64),
        ("time_enabled", ctypes.c_uint64),
        ("time_running", ctypes.c_uint64),
        ("capabilities", ctypes.c_uint64),
        ("pmc_width", ctypes.c_uint16),
        ("time_shift", ctypes.c_uint16),
        ("time_mult", ctypes.c_uint32),
        ("time_offset", ctypes.c_uint64),
        ("time_zero", ctypes.c_uint64),
        ("size", ctypes.c_uint32),
        ("reserved_1", ctypes.c_uint32),
        ("time_cycles", ctypes.c_uint64),
        ("time_mask", ctypes.c_uint64),
        ("reserved", ctypes.c_uint8 * (116 * 8)),
        ("data_head", ctypes.c_uint64),
        ("data_tail", ctypes.c_uint64),
        ("data_offset", ctypes.c_uint64),
        ("data_size", ctypes.c_uint64),
    ]


DATA_HEAD_OFFSET = PerfEventMmapPage.data_head.offset  # 1024
DATA_TAIL_OFFSET = PerfEventMmapPage.data_tail.offset  # 1032
DATA_OFFSET_OFFSET = PerfEventMmapPage.data_offset.offset  # 1040
DATA_SIZE_OFFSET = PerfEventMmapPage.data_size.offset  # 1048


class PerfOpenError(TierdError):
    """perf_event_open failed; `errno` says why (see reason_for)."""

    def __init__(self, err: int, what: str) -> None:
        self.errno = err
        self.what = what
        super().__init__(f"perf_event_open({what}): {reason_for(err)}")


def reason_for(err: int) -> str:
    """What a perf_event_open errno means for tierd, in words an operator can act on."""
    reasons = {
        errno.EACCES: "permission denied (kernel.perf_event_paranoid, or needs CAP_PERFMON)",
        errno.EPERM: "not permitted (kernel.perf_event_paranoid, or needs CAP_PERFMON)",
        errno.ENOENT: "no such event on this PMU (the PMU or event is gone)",
        errno.ENODEV: "the PMU is gone or the CPU is offline",
        errno.EOPNOTSUPP: "this PMU cannot sample (no overflow interrupt)",
        errno.EINVAL: "the PMU refused the attributes (sample_type or config)",
        errno.EMFILE: "too many open files",
        errno.ENOSYS: "perf_event_open is not implemented by this kernel",
    }
    return reasons.get(err, os.strerror(err))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, what: str = "") -> int:
    """Open one event (pid -1 and a cpu: system-wide on that CPU); returns the fd."""
    attr.size = ctypes.sizeof(PerfEventAttr)
    fd: int = _libc.syscall(
        ctypes.c_long(SYS_PERF_EVENT_OPEN), ctypes.byref(attr), ctypes.c_int(pid),
        ctypes.c_int(cpu), ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC),
    )
    if fd < 0:
        raise PerfOpenError(ctypes.get_errno(), what or f"type {attr.type} cpu {cpu}")
    return fd


def enable(fd: int) -> None:
    fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)


def disable(fd: int) -> None:
    fcntl.ioctl(fd, PERF_EVENT_IOC_DISABLE, 0)


class PerfRing:
    """The mmap'ed ring of one event: a header page and 2^n data pages.

    Works on any buffer with that layout, so unit tests drive it with an
    anonymous mapping they fill themselves.
    """

    def __init__(self, buffer: mmap.mmap) -> None:
        self._buffer = buffer
        self._head = ctypes.c_uint64.from_buffer(buffer, DATA_HEAD_OFFSET)
        self._tail = ctypes.c_uint64.from_buffer(buffer, DATA_TAIL_OFFSET)
        self.data_offset = ctypes.c_uint64.from_buffer(buffer, DATA_OFFSET_OFFSET).value
        self.data_size = ctypes.c_uint64.from_buffer(buffer, DATA_SIZE_OFFSET).value

    @classmethod
    def map(cls, fd: int, data_pages: int) -> PerfRing:
        """Map the ring of `fd` writable, so the kernel never overwrites unread records."""
        if data_pages <= 0 or data_pages & (data_pages - 1):
            raise ValueError(f"data_pages must be a power of two, not {data_pages}")
        length = (1 + data_pages) * mmap.PAGESIZE
        return cls(mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))

    def read(self) -> bytes:
        """Every complete record published since the last read, in order; frees their space."""
        head = self._head.value  # acquire: x86-64 loads are not reordered with later loads
        tail = self._tail.value
        size = self.data_size
        if head == tail:
            return b""
        start = tail % size
        length = head - tail
        base = self.data_offset
        first = min(length, size - start)
        data = self._buffer[base + start: base + start + first]
        if first < length:  # the records wrap around the end of the data area
            data += self._buffer[base: base + length - first]
        self._tail.value = head  # release: stores are not reordered with earlier loads
        return data

    def close(self) -> None:
        del self._head, self._tail
        self._buffer.close()


@dataclass(frozen=True)
class Decoded:
    """The records of one ring read: the samples and what else was in it."""

    samples: npt.NDArray[np.void]  # structured, dtype sample_dtype(sample_type)
    lost: int  # samples the kernel dropped (PERF_RECORD_LOST, LOST_SAMPLES)
    other: int  # records of other types, skipped


def sample_dtype(sample_type: int) -> np.dtype[np.void]:
    """The numpy dtype of one PERF_RECORD_SAMPLE (header included) for `sample_type`."""
    unsupported = sample_type & ~_FIXED_BITS
    if unsupported:
        raise ValueError(f"sample_type bits {unsupported:#x} have variable-size payloads")
    if sample_type & SAMPLE_WEIGHT and sample_type & SAMPLE_WEIGHT_STRUCT:
        raise ValueError("WEIGHT and WEIGHT_STRUCT are mutually exclusive")
    fields: list[tuple[str, Any]] = [("header", HEADER_DTYPE)]
    for bit, bit_fields in _FIELD_ORDER:
        if sample_type & bit:
            fields.extend(bit_fields)
    return np.dtype(fields)


def decode(data: bytes, sample_type: int) -> Decoded:
    """Decode a ring read: samples as one structured array, LOST counted, others skipped."""
    dtype = sample_dtype(sample_type)
    size = dtype.itemsize
    if len(data) % size == 0:
        samples = np.frombuffer(data, dtype=dtype)
        header = samples["header"]
        if np.all((header["type"] == RECORD_SAMPLE) & (header["size"] == size)):
            return Decoded(samples, 0, 0)  # the common case: nothing but samples
    return _decode_mixed(data, dtype)


SAMPLE_HEADER_MASK = np.uint64(0xFFFF_0000_FFFF_FFFF)  # type and size; misc varies


class _SampleRuns:
    """Where runs of fixed-size SAMPLE records end, found vectorially per stride phase.

    A run that starts at word w continues at w + stride, w + 2 * stride, ...
    so it lies in one phase (w % stride) of the buffer's words. For each phase
    actually visited (one, unless other records shift the alignment), every
    word of the phase is tested at once as a SAMPLE header of the right size;
    a run's length is then one binary search for the next word that is not.
    """

    def __init__(self, words: npt.NDArray[np.uint64], dtype: np.dtype[np.void]) -> None:
        self.words = words
        self.stride = dtype.itemsize // 8
        self.header = np.uint64(RECORD_SAMPLE | dtype.itemsize << 48)
        self._breaks: dict[int, npt.NDArray[np.intp]] = {}

    def _breaks_of(self, phase: int) -> npt.NDArray[np.intp]:
        if phase not in self._breaks:
            column = self.words[phase::self.stride]
            ok = (column & SAMPLE_HEADER_MASK) == self.header
            fits = (self.words.size - phase) // self.stride  # records that fit from this phase
            ok[fits:] = False
            self._breaks[phase] = np.append(np.flatnonzero(~ok), column.size)
        return self._breaks[phase]

    def length_at(self, word: int) -> int:
        """How many SAMPLE records follow one another from `word` on."""
        breaks = self._breaks_of(word % self.stride)
        index = word // self.stride
        return int(breaks[np.searchsorted(breaks, index)] - index)


def _decode_mixed(data: bytes, dtype: np.dtype[np.void]) -> Decoded:
    """Samples among other records: one step per run of samples and one per other record."""
    words = np.frombuffer(data, dtype="<u8", count=len(data) // 8)
    runs = _SampleRuns(words, dtype)
    parts: list[npt.NDArray[np.void]] = []
    lost = other = 0
    at = 0
    while at < words.size:
        count = runs.length_at(at)
        if count:
            parts.append(np.frombuffer(data, dtype=dtype, count=count, offset=at * 8))
            at += count * runs.stride
            continue
        header = int(words[at])
        rtype, rsize = header & 0xFFFF_FFFF, header >> 48
        if rsize < HEADER_SIZE or rsize % 8 or at * 8 + rsize > len(data):
            raise ValueError(f"corrupt perf record at byte {at * 8}: size {rsize}")
        if rtype == RECORD_LOST:  # u64 id, u64 lost
            lost += int(words[at + 2])
        elif rtype == RECORD_LOST_SAMPLES:  # u64 lost
            lost += int(words[at + 1])
        else:
            other += 1
        at += rsize // 8
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return Decoded(samples, lost, other)


# union perf_mem_data_src, little-endian bitfields: (name, shift, width)
DATA_SRC_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("mem_op", 0, 5),
    ("mem_lvl", 5, 14),
    ("mem_snoop", 19, 5),
    ("mem_lock", 24, 2),
    ("mem_dtlb", 26, 7),
    ("mem_lvl_num", 33, 4),
    ("mem_remote", 37, 1),
    ("mem_snoopx", 38, 2),
    ("mem_blk", 40, 3),
    ("mem_hops", 43, 3),
)
MEM_OP_LOAD = 0x02
MEM_OP_STORE = 0x04
MEM_LVL_HIT = 0x02
MEM_LVL_MISS = 0x04
MEM_LVL_L1 = 0x08
MEM_LVL_L3 = 0x40
MEM_LVL_LOC_RAM = 0x80
MEM_LVL_REM_RAM1 = 0x100
MEM_LVLNUM_L1 = 0x01
MEM_LVLNUM_L2 = 0x02
MEM_LVLNUM_L3 = 0x03
MEM_LVLNUM_MSC = 0x06
MEM_LVLNUM_CXL = 0x09
MEM_LVLNUM_ANY_CACHE = 0x0B
MEM_LVLNUM_LFB = 0x0C
MEM_LVLNUM_RAM = 0x0D
MEM_LVLNUM_PMEM = 0x0E
MEM_LVLNUM_NA = 0x0F
MEM_SNOOP_NA = 0x01
MEM_TLB_HIT = 0x02
MEM_TLB_L1 = 0x08
MEM_HOPS_0 = 0x01


def decode_data_src(values: npt.NDArray[np.uint64]) -> dict[str, npt.NDArray[np.uint64]]:
    """Split DATA_SRC words into their perf_mem_data_src fields, one array per field."""
    words = np.asarray(values, dtype=np.uint64)
    return {
        name: (words >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        for name, shift, width in DATA_SRC_FIELDS
    }


# Where a sample's data came from, coarsely: what a tiering daemon can act on.
SOURCES = ("cache", "local_ram", "remote_ram", "cxl", "unknown")


def memory_source(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint8]:
    """Index into SOURCES per DATA_SRC word: cache hit, local DRAM, remote DRAM, CXL, or unknown.

    Uses mem_lvl_num where the PMU fills it (AMD IBS, recent Intel) and the
    older mem_lvl bits otherwise.
    """
    f = decode_data_src(values)
    lvl_num, lvl, remote = f["mem_lvl_num"], f["mem_lvl"], f["mem_remote"] != 0
    ram = (lvl_num == MEM_LVLNUM_RAM) | (lvl_num == MEM_LVLNUM_PMEM)
    cache = (
        ((lvl_num >= MEM_LVLNUM_L1) & (lvl_num <= MEM_LVLNUM_MSC))
        | (lvl_num == MEM_LVLNUM_ANY_CACHE)
        | (lvl_num == MEM_LVLNUM_LFB)
    )
    legacy = (lvl_num == 0) | (lvl_num == MEM_LVLNUM_NA)
    legacy_local = legacy & ((lvl & np.uint64(MEM_LVL_LOC_RAM)) != 0)
    legacy_remote = legacy & ((lvl & np.uint64(0x300)) != 0)  # REM_RAM1 | REM_RAM2
    legacy_cache = legacy & ((lvl & np.uint64(0xC78)) != 0) & ((lvl & np.uint64(MEM_LVL_HIT)) != 0)
    out = np.full(lvl_num.shape, SOURCES.index("unknown"), dtype=np.uint8)
    out[cache | legacy_cache] = SOURCES.index("cache")
    out[(ram & ~remote) | legacy_local] = SOURCES.index("local_ram")
    out[(ram & remote) | legacy_remote] = SOURCES.index("remote_ram")
    out[lvl_num == MEM_LVLNUM_CXL] = SOURCES.index("cxl")
    return out


def read_paranoid(root: HostRoot = HOST) -> int | None:
    """kernel.perf_event_paranoid, or None where perf is not built in (or unreadable)."""
    try:
        return int(root.read_text(PARANOID).strip())
    except (KernelFileError, ValueError):
        return None
