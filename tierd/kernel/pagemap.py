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
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError
from tierd.kernel.root import HOST, HostRoot

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
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


class ProcessGoneError(KernelFileError):
    """The process exited (or became a zombie) while tierd was reading it."""


def pfn_of(entries: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The PFN of each present page, 0 for pages not present (or swapped)."""
    return np.where(is_present(entries), entries & PFN_MASK, np.uint64(0))


def is_present(entries: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    return (entries & PRESENT) != 0


def is_exclusive(entries: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    return (entries & EXCLUSIVE) != 0


def is_file_or_shared(entries: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    return (entries & FILE_SHARED) != 0


def is_soft_dirty(entries: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    return (entries & SOFT_DIRTY) != 0


def _open_pagemap(pid: int, root: HostRoot) -> int:
    path = root(f"/proc/{pid}/pagemap")
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ProcessGoneError(path, "process gone") from None
    except PermissionError:
        raise KernelFileError(path, "permission denied (needs PTRACE_MODE_READ)") from None
    except OSError as e:
        raise KernelFileError(path, e.strerror or str(e)) from None


def _pread_into(fd: int, pid: int, first_page: int, out: npt.NDArray[np.uint64],
                root: HostRoot) -> None:
    """Fill `out` with the entries of the pages from `first_page`; past the end they read as 0."""
    view = memoryview(out).cast("B")
    done = 0
    while done < view.nbytes:
        try:
            n = os.preadv(fd, [view[done:]], first_page * ENTRY_BYTES + done)
        except OSError as e:
            path = root(f"/proc/{pid}/pagemap")
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
    _pread_into(fd, pid, first_page, out, root)
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
    pages = [(start >> PAGE_SHIFT, end >> PAGE_SHIFT) for start, end in ranges]
    out = np.empty(sum(last - first for first, last in pages), dtype=np.uint64)
    fd = _open_pagemap(pid, root)
    try:
        at = 0
        for first, last in _touching_merged(pages):
            _pread_into(fd, pid, first, out[at:at + last - first], root)
            at += last - first
    finally:
        os.close(fd)
    return out


def _touching_merged(pages: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, last) page ranges with each range that starts where the previous ends merged in."""
    merged: list[tuple[int, int]] = []
    for first, last in pages:
        if merged and merged[-1][1] == first:
            merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def _runs(pages: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Split sorted unique page numbers into [first, last] runs with small gaps merged."""
    breaks = np.flatnonzero(np.diff(pages) > MERGE_GAP_PAGES) + 1
    firsts = pages[np.concatenate(([0], breaks))]
    lasts = pages[np.concatenate((breaks - 1, [pages.size - 1]))]
    return firsts, lasts


def entries_of(pid: int, vaddrs: npt.ArrayLike, root: HostRoot = HOST
               ) -> npt.NDArray[np.uint64]:
    """The pagemap entry of the page holding each of `vaddrs` (any order, repeats allowed)."""
    addrs = np.asarray(vaddrs, dtype=np.uint64)
    if addrs.size == 0:
        return np.zeros(0, dtype=np.uint64)
    pages = addrs >> np.uint64(PAGE_SHIFT)
    inverse = None
    if np.all(pages[1:] > pages[:-1]):  # the movers' case: already sorted and unique
        unique = pages
    else:
        unique, inverse = np.unique(pages, return_inverse=True)
    firsts, lasts = _runs(unique)
    fd = _open_pagemap(pid, root)
    try:
        spans = [_pread_entries(fd, pid, int(f), int(la - f) + 1, root)
                 for f, la in zip(firsts, lasts, strict=True)]
    finally:
        os.close(fd)
    flat = np.concatenate(spans)
    if flat.size != unique.size:  # gaps were read through: pick the pages out
        # Offset of each unique page inside `flat`: its run's offset plus its distance
        # from the run's first page.
        run_of = np.searchsorted(firsts, unique, side="right") - 1
        run_offsets = np.concatenate(([0], np.cumsum(lasts - firsts + 1)[:-1])).astype(np.uint64)
        flat = flat[(run_offsets[run_of] + (unique - firsts[run_of])).astype(np.intp)]
    return flat if inverse is None else flat[inverse]


def pfns_of(pid: int, vaddrs: npt.ArrayLike, root: HostRoot = HOST) -> npt.NDArray[np.uint64]:
    """The PFN backing each of `vaddrs` in `pid`, 0 where the page is not present."""
    return pfn_of(entries_of(pid, vaddrs, root))


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


def _parse_maps_line(line: str) -> Mapping:
    fields = line.split(maxsplit=5)
    start, end = fields[0].split("-")
    return Mapping(
        start=int(start, 16), end=int(end, 16), perms=fields[1], offset=int(fields[2], 16),
        inode=int(fields[4]), path=fields[5].rstrip("\n") if len(fields) > 5 else "",
    )


def read_maps(pid: int, root: HostRoot = HOST) -> list[Mapping]:
    """The mappings of `pid`; ProcessGoneError when it exited."""
    path = root(f"/proc/{pid}/maps")
    try:
        text = path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGoneError(path, "process gone") from None
    except OSError as e:
        raise KernelFileError(path, e.strerror or str(e)) from None
    mappings = []
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            mappings.append(_parse_maps_line(line))
        except (ValueError, IndexError):
            raise KernelFileError(path, f"malformed line {line!r}", key=f"line {lineno}") from None
    return mappings


def scannable(mappings: list[Mapping]) -> list[Mapping]:
    """The mappings worth reading pagemap for: readable, not the vdso family."""
    return [m for m in mappings if m.readable and m.path not in _SPECIAL]
