"""/proc/kpageflags, /proc/kpagecount and /proc/kpagecgroup as numpy arrays.

Each file holds one native-endian u64 per PFN (flags, mapcount, memcg inode).
`PfnFile` keeps the file open and reads a PFN range into a caller's buffer,
so a scan over millions of PFNs reuses one array and costs one pread per
chunk. Reads must be 8-byte aligned; the kernel answers EOF past its last
PFN, and we fill that tail with what the kernel reports for a hole
(KPF_NOPAGE for flags, 0 for counts and cgroups).

Flag bits are the kernel's (include/uapi/linux/kernel-page-flags.h and the
kernel-internal ones it also exports, include/linux/kernel-page-flags.h).
"""

from __future__ import annotations

import os
from typing import cast

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError
from tierd.kernel import _gather
from tierd.kernel.kernel_fd import KernelFd, gather_in_any_order
from tierd.kernel.root import HOST, HostRoot

KPAGEFLAGS = "/proc/kpageflags"
KPAGECOUNT = "/proc/kpagecount"
KPAGECGROUP = "/proc/kpagecgroup"
ENTRY_BYTES = 8
# Two PFNs closer than this are read in one pread by PfnFile.read_at().
MERGE_GAP_PFNS = 512
ALL_BITS = 2**64 - 1

KPF_LOCKED = 0
KPF_REFERENCED = 2
KPF_UPTODATE = 3
KPF_DIRTY = 4
KPF_LRU = 5
KPF_ACTIVE = 6
KPF_SLAB = 7
KPF_WRITEBACK = 8
KPF_RECLAIM = 9
KPF_BUDDY = 10
KPF_MMAP = 11
KPF_ANON = 12
KPF_SWAPCACHE = 13
KPF_SWAPBACKED = 14
KPF_COMPOUND_HEAD = 15
KPF_COMPOUND_TAIL = 16
KPF_HUGE = 17  # hugetlbfs
KPF_UNEVICTABLE = 18
KPF_HWPOISON = 19
KPF_NOPAGE = 20  # a hole: no struct page
KPF_KSM = 21
KPF_THP = 22
KPF_OFFLINE = 23
KPF_ZERO_PAGE = 24
KPF_IDLE = 25
KPF_PGTABLE = 26
KPF_RESERVED = 32
KPF_MLOCKED = 33

# Pages a mover must never touch: pinned in memory by mlock or otherwise
# unevictable (ramfs, SHM_LOCK), poisoned, or not backed by a page at all.
UNMOVABLE_BITS = (KPF_UNEVICTABLE, KPF_MLOCKED, KPF_HWPOISON, KPF_NOPAGE, KPF_RESERVED)


def mask(*bits: int) -> np.uint64:
    """The u64 mask with the given KPF_* bits set."""
    value = 0
    for b in bits:
        value |= 1 << b
    return np.uint64(value)


def has_any(flags: npt.NDArray[np.uint64], *bits: int) -> npt.NDArray[np.bool_]:
    """Per PFN: is any of the KPF_* `bits` set in `flags`?"""
    return cast(npt.NDArray[np.bool_], (flags & mask(*bits)) != 0)


def unmovable(flags: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    """Per PFN: mlocked, unevictable, poisoned, reserved or a hole."""
    return has_any(flags, *UNMOVABLE_BITS)


class PfnFile(KernelFd):
    """One of the per-PFN u64 files, open for repeated range reads."""

    def __init__(self, kernel_path: str, root: HostRoot = HOST, fill: int = 0) -> None:
        super().__init__(root(kernel_path), os.O_RDONLY)
        self.fill = np.uint64(fill)

    def read_into(self, pfn_start: int, out: npt.NDArray[np.uint64]) -> int:
        """Fill `out` with the entries of PFNs [pfn_start, pfn_start + out.size).

        Returns how many entries the kernel had; the rest (past its last
        PFN) is set to `fill`. Raises KernelFileError naming the offset of
        a failed read.
        """
        offset = pfn_start * ENTRY_BYTES
        done = self._pread_into(out.view(np.uint8).data, offset)
        if done % ENTRY_BYTES:
            raise KernelFileError(self.path, "read ends inside an entry",
                                  key=f"offset {offset + done:#x}")
        got = done // ENTRY_BYTES
        out[got:] = self.fill
        return got

    def read_at(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """The entry of each of `pfns` (any order, repeats allowed), one pread per run.

        A batch's PFNs ascend, mostly in gap-free runs (pages the allocator
        handed out together), read straight into the result; the cutting into
        runs is in C (tierd/kernel/_gather.c), one pass where numpy took a dozen.
        """
        return gather_in_any_order(pfns, self._gather)

    def _gather(self, pfns: npt.NDArray[np.uint64], out: npt.NDArray[np.uint64]) -> bool:
        try:
            return _gather.gather(self._open(), pfns, 0, out, int(self.fill), MERGE_GAP_PFNS,
                                  ALL_BITS)
        except OSError as e:
            raise self._error(e, e.filename) from None

    def read(self, pfn_start: int, count: int) -> npt.NDArray[np.uint64]:
        """A new array with the entries of PFNs [pfn_start, pfn_start + count)."""
        out = np.empty(count, dtype=np.uint64)
        self.read_into(pfn_start, out)
        return out


def kpageflags(root: HostRoot = HOST) -> PfnFile:
    """/proc/kpageflags; PFNs past the kernel's last read as KPF_NOPAGE."""
    return PfnFile(KPAGEFLAGS, root, fill=1 << KPF_NOPAGE)


def kpagecount(root: HostRoot = HOST) -> PfnFile:
    """/proc/kpagecount: how many times each PFN is mapped."""
    return PfnFile(KPAGECOUNT, root)


def kpagecgroup(root: HostRoot = HOST) -> PfnFile:
    """/proc/kpagecgroup: the inode of each PFN's memory cgroup (0: none)."""
    return PfnFile(KPAGECGROUP, root)


def read_flags(pfn_start: int, count: int, root: HostRoot = HOST) -> npt.NDArray[np.uint64]:
    """One-shot read of the flags of PFNs [pfn_start, pfn_start + count)."""
    with kpageflags(root) as f:
        return f.read(pfn_start, count)
