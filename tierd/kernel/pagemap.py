"""/proc/PID/pagemap and /proc/PID/maps: a process's virtual pages and where they live.

pagemap holds one native-endian u64 per virtual page (Documentation/admin-guide/
mm/pagemap.rst): PFN in bits 0-54 (zero without CAP_SYS_ADMIN), 55 soft-dirty,
56 exclusively mapped, 57 uffd-wp, 61 file page or shared anon, 62 swapped,
63 present. Readers here return whole ranges as numpy arrays: one pread per
contiguous range, never one per page.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError
from tierd.kernel import _gather
from tierd.kernel.kernel_fd import gather_in_any_order
from tierd.kernel.root import HOST, HostRoot
from tierd.vocabulary import PAGE_SHIFT, PAGE_SIZE

ENTRY_BYTES = 8

PFN_MASK = np.uint64((1 << 55) - 1)
SOFT_DIRTY = np.uint64(1 << 55)
EXCLUSIVE = np.uint64(1 << 56)
UFFD_WP = np.uint64(1 << 57)
FILE_SHARED = np.uint64(1 << 61)
SWAPPED = np.uint64(1 << 62)
PRESENT = np.uint64(1 << 63)

# Two sampled pages closer than this many pages are read in one pread: reading
# a few hundred bytes of gap is cheaper than another syscall.
MERGE_GAP_PAGES = 512
# seq_file hands out at most a page or so per read; a larger buffer costs nothing.
READ_CHUNK = 1 << 16


class ProcessGoneError(KernelFileError):
    """The process exited (or became a zombie) while tierd was reading it."""


def pfn_of(entries: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The PFN of each present page, 0 for pages not present (or swapped)."""
    pfns = entries & PFN_MASK
    pfns[entries < PRESENT] = 0  # bit 63 clear
    return pfns


def read_proc_file(path: str) -> bytes:
    """The whole of a per-process /proc file, read with plain os calls (no Path, no decoding).

    Raises ProcessGoneError when the process exited, KernelFileError otherwise.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, READ_CHUNK):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGoneError(path, "process gone") from None
    except OSError as e:
        raise KernelFileError(path, e.strerror or str(e)) from None
    return b"".join(chunks)


def _open_pagemap(pid: int, root: HostRoot) -> int:
    path = root.fspath(f"/proc/{pid}/pagemap")
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ProcessGoneError(path, "process gone") from None
    except PermissionError:
        raise KernelFileError(path, "permission denied (needs PTRACE_MODE_READ)") from None
    except OSError as e:
        raise KernelFileError(path, e.strerror or str(e)) from None


def _pread_into(fd: int, pid: int, first_page: int, view: memoryview, root: HostRoot) -> None:
    """Fill `view` (bytes) with the entries of the pages from `first_page`; past the end
    they read as 0."""
    done = 0
    while done < view.nbytes:
        try:
            n = os.preadv(fd, [view[done:]], first_page * ENTRY_BYTES + done)
        except OSError as e:
            path = root.fspath(f"/proc/{pid}/pagemap")
            if e.errno == errno.ESRCH:
                raise ProcessGoneError(path, "process gone") from None
            raise KernelFileError(path, e.strerror or str(e),
                                  key=f"page {first_page + done // ENTRY_BYTES:#x}") from None
        if n == 0:  # past the end of the address space, or the mm went away
            view[done:] = bytes(view.nbytes - done)
            return
        done += n


def _pread_entries(fd: int, pid: int, first_page: int, npages: int, root: HostRoot
                   ) -> npt.NDArray[np.uint64]:
    """Entries of pages [first_page, first_page + npages); pages past the end read as 0."""
    out = np.empty(npages, dtype=np.uint64)
    _pread_into(fd, pid, first_page, out.view(np.uint8).data, root)
    return out


def read_pagemap(pid: int, vaddr_start: int, npages: int, root: HostRoot = HOST
                 ) -> npt.NDArray[np.uint64]:
    """The pagemap entries of `npages` pages of `pid` starting at `vaddr_start`.

    `vaddr_start` must be page aligned. Raises ProcessGoneError when the
    process has exited, KernelFileError for any other failure.
    """
    if vaddr_start % PAGE_SIZE:
        raise ValueError(f"vaddr {vaddr_start:#x} is not page aligned")
    fd = _open_pagemap(pid, root)
    try:
        return _pread_entries(fd, pid, vaddr_start >> PAGE_SHIFT, npages, root)
    finally:
        os.close(fd)


def read_ranges(pid: int, ranges: list[tuple[int, int]], root: HostRoot = HOST
                ) -> npt.NDArray[np.uint64]:
    """Entries of several [start, end) vaddr ranges, concatenated in order, one open.

    Ranges that touch (a library's segments, stacked anonymous mappings) are
    read in one pread, straight into the result.
    """
    runs = _touching_merged([(start >> PAGE_SHIFT, end >> PAGE_SHIFT) for start, end in ranges])
    out = np.empty(sum(last - first for first, last in runs), dtype=np.uint64)
    read_runs(pid, runs, out, root)
    return out


def read_runs(pid: int, runs: Iterable[tuple[int, int]], out: npt.NDArray[np.uint64],
              root: HostRoot = HOST) -> None:
    """Fill `out` with the entries of the [first, last) page runs, concatenated, one pread
    per run, straight into `out`."""
    view = out.view(np.uint8).data
    fd = _open_pagemap(pid, root)
    try:
        at = 0
        for first, last in runs:
            end = at + (last - first) * ENTRY_BYTES
            _pread_into(fd, pid, first, view[at:end], root)
            at = end
    finally:
        os.close(fd)


def _touching_merged(pages: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, last) page ranges with each range that starts where the previous ends merged in."""
    merged: list[tuple[int, int]] = []
    for first, last in pages:
        if merged and merged[-1][1] == first:
            merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def entries_of(pid: int, vaddrs: npt.ArrayLike, root: HostRoot = HOST
               ) -> npt.NDArray[np.uint64]:
    """The pagemap entry of the page holding each of `vaddrs` (any order, repeats allowed)."""
    if np.size(vaddrs) == 0:
        return np.zeros(0, dtype=np.uint64)
    with Pagemap(pid, root) as pages:
        return pages.entries_of(vaddrs)


def pfns_of(pid: int, vaddrs: npt.ArrayLike, root: HostRoot = HOST) -> npt.NDArray[np.uint64]:
    """The PFN backing each of `vaddrs` in `pid`, 0 where the page is not present."""
    if np.size(vaddrs) == 0:
        return np.zeros(0, dtype=np.uint64)
    with Pagemap(pid, root) as pages:
        return pages.pfns_of(vaddrs)


class Pagemap:
    """/proc/PID/pagemap, open for several reads (a mover reads a batch's pages before and
    after moving them). Raises ProcessGoneError when the process has exited."""

    def __init__(self, pid: int, root: HostRoot = HOST) -> None:
        self.pid, self.root = pid, root
        self._fd = _open_pagemap(pid, root)

    def entries_of(self, vaddrs: npt.ArrayLike) -> npt.NDArray[np.uint64]:
        """The entry of the page holding each of `vaddrs` (any order, repeats allowed)."""
        return self._gather(vaddrs, mask=2**64 - 1)

    def pfns_of(self, vaddrs: npt.ArrayLike) -> npt.NDArray[np.uint64]:
        """The PFN backing each of `vaddrs`, 0 where the page is not present."""
        return self._gather(vaddrs, mask=int(PFN_MASK))

    def _gather(self, vaddrs: npt.ArrayLike, mask: int) -> npt.NDArray[np.uint64]:
        """The entries (ANDed with `mask`) of the pages holding `vaddrs`, in one C pass
        (tierd/kernel/_gather.c) where they ascend, as the movers' do; pages at most
        MERGE_GAP_PAGES apart are read in one pread."""
        return gather_in_any_order(vaddrs, lambda addrs, out: self._gather_pages(addrs, out, mask))

    def _gather_pages(self, addrs: npt.NDArray[np.uint64], out: npt.NDArray[np.uint64],
                      mask: int) -> bool:
        try:
            return _gather.gather(self._fd, addrs, PAGE_SHIFT, out, 0, MERGE_GAP_PAGES, mask)
        except OSError as e:
            path = self.root.fspath(f"/proc/{self.pid}/pagemap")
            if e.errno == errno.ESRCH:
                raise ProcessGoneError(path, "process gone") from None
            raise KernelFileError(path, e.strerror or str(e),
                                  key=f"page {e.filename // ENTRY_BYTES:#x}") from None

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str

    @property
    def npages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT

    @property
    def readable(self) -> bool:
        return self.perms.startswith("r")


# Mappings whose pages never belong to a migratable user LRU page.
_SPECIAL = ("[vsyscall]", "[vvar]", "[vdso]", "[vvar_vclock]")

# A line of /proc/PID/maps: start-end perms offset dev inode [path]. One findall over the
# file costs less than splitting each line in Python.
_MAPS_LINE = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) \S+ (\d+) *([^\n]*)$",
                        re.MULTILINE)
# The same lines as (start, end, b"r" if scannable else b""), for a whole-process read:
# fewer fields to capture, and a line that does not start "start-end " does not match.
_RUN_LINE = re.compile(
    rb"^([0-9a-f]+)-([0-9a-f]+) (?:(r)[^\n]*+"
    + b"".join(b"(?<! " + re.escape(os.fsencode(name)) + b")" for name in _SPECIAL)
    + rb"|[^\n]*+)$", re.MULTILINE)


def _matched_lines(pid: int, text: bytes, line: re.Pattern[bytes], root: HostRoot
                   ) -> list[tuple[bytes, ...]]:
    """The groups of `line` in each line of `pid`'s maps `text`; KernelFileError naming
    the first line it does not match."""
    found = line.findall(text)
    if len(found) != text.count(b"\n") + (not text.endswith(b"\n") and bool(text)):
        lineno, bad = next((n, s) for n, s in enumerate(text.split(b"\n"), 1)
                           if not line.fullmatch(s))
        raise KernelFileError(root.fspath(f"/proc/{pid}/maps"),
                              f"malformed line {os.fsdecode(bad)!r}", key=f"line {lineno}")
    return found


def read_maps_text(pid: int, root: HostRoot = HOST) -> bytes:
    """/proc/PID/maps as read (empty for a kernel thread); ProcessGoneError when it exited."""
    return read_proc_file(root.fspath(f"/proc/{pid}/maps"))


def read_maps(pid: int, root: HostRoot = HOST) -> list[Mapping]:
    """The mappings of `pid`; ProcessGoneError when it exited."""
    lines = _matched_lines(pid, read_maps_text(pid, root), _MAPS_LINE, root)
    return [Mapping(start=int(start, 16), end=int(end, 16), perms=perms.decode(),
                    offset=int(offset, 16), inode=int(inode), path=os.fsdecode(path))
            for start, end, perms, offset, inode, path in lines]


# One mapping of /proc/PID/smaps: its maps line, its fields, and the VmFlags line that
# ends them (the kernel prints VmFlags last).
_SMAPS_MAPPING = re.compile(rb"^([0-9a-f]+)-([0-9a-f]+) [^\n]*\n(?:[^\n]*\n)*?VmFlags:([^\n]*)$",
                            re.MULTILINE)
_SMAPS_HEADER = re.compile(rb"^[0-9a-f]+-[0-9a-f]+ ", re.MULTILINE)


def locked_ranges(pid: int, root: HostRoot = HOST) -> list[tuple[int, int]]:
    """The [start, end) vaddr ranges of `pid`'s mlocked mappings: "lo" in smaps' VmFlags.

    kpageflags cannot say: a large folio mapped by PTEs (a THP split by mprotect,
    an mTHP) is locked by its mapping yet carries neither PG_mlocked nor
    PG_unevictable. smaps walks the page tables: read it only for a process whose
    status counts locked memory.
    """
    path = root.fspath(f"/proc/{pid}/smaps")
    text = read_proc_file(path)
    found = _SMAPS_MAPPING.findall(text)
    if len(found) != len(_SMAPS_HEADER.findall(text)):
        raise KernelFileError(path, "a mapping without a VmFlags line", key="VmFlags")
    return [(int(start, 16), int(end, 16)) for start, end, flags in found
            if b"lo" in flags.split()]


def scannable(mappings: list[Mapping]) -> list[Mapping]:
    """The mappings worth reading pagemap for: readable, not the vdso family."""
    return [m for m in mappings if m.readable and m.path not in _SPECIAL]


def scannable_runs(pid: int, maps: bytes, root: HostRoot = HOST) -> list[tuple[int, int]]:
    """The [first, last) page runs of the scannable mappings in `pid`'s maps text, touching
    ones merged: what a whole-process pagemap read needs, without a Mapping per line.

    Touching is compared on the text (the kernel prints both ends alike), so only each
    run's two ends become ints.
    """
    runs: list[list[bytes]] = []
    for start, end, scan in _matched_lines(pid, maps, _RUN_LINE, root):
        if not scan:
            continue
        if runs and runs[-1][1] == start:
            runs[-1][1] = end
        else:
            runs.append([start, end])
    return [(int(start, 16) >> PAGE_SHIFT, int(end, 16) >> PAGE_SHIFT) for start, end in runs]
