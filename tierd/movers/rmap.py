"""Reverse map PFN -> (pid, vaddr), built from /proc/PID/pagemap, for the PID mover.

Memory: 20 bytes per extent (tierd.movers.extents): a run of consecutive
PFNs mapped at consecutive virtual pages of one process, at most a 2 MiB
block long. The owner of a page is

    owner  uint64 = (slot << 44) | virtual page number

A slot names one process (a small table slot -> pid); 44 bits of virtual
page number cover a 56-bit user address space (5-level paging), 20 bits of
slot a million processes. The per-process table costs ~200 bytes a process.
A shared page appears once per process mapping it. A THP is one extent and
the buddy allocator hands out runs, so a host needs one extent per tens of
pages, where a map of pages would cost 16 bytes each (4 GiB on a 1 TiB host).

Corrections from the movers cost O(extents) per batch: a page that left its
PFN splits its extents around it; the pages that followed their page to a
new PFN join the map as extents of their own, consecutive ones merged.

Refreshes are incremental: a process is re-read only when it is new, when
its /proc/PID/maps or resident page count changed since its last read,
when a move showed one of its entries stale, or when its last read is older
than `full_every` refreshes (the kernel migrates, compacts and reclaims
without changing either fingerprint). Excluded processes are never read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import pairwise
from typing import NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt

from tierd.collectors.processes import ProcessFilter
from tierd.errors import KernelFileError
from tierd.kernel import pagemap, task
from tierd.kernel.pagemap import ProcessGoneError
from tierd.kernel.root import HOST, HostRoot
from tierd.movers import _native
from tierd.movers.extents import BLOCK_PFNS, DEAD, U64, ExtentMap, extent_arrays, runs
from tierd.vocabulary import PAGE_SHIFT

log = logging.getLogger(__name__)

VPN_BITS = 44
VPN_MASK = np.uint64((1 << VPN_BITS) - 1)
# The top slot is never handed out, so no entry's owner is DEAD.
MAX_SLOTS = (1 << (64 - VPN_BITS)) - 1
_A = TypeVar("_A", npt.NDArray[np.uint64], npt.NDArray[np.uint32])
# Pagemap entries read at a time: bounds a refresh's temporaries (8 MiB and its owners).
READ_PAGES = 1 << 20


@dataclass
class _Process:
    slot: int
    fingerprint: int  # hash of /proc/PID/maps and the resident page count
    read_at: int  # refresh number of the last read
    stale: bool = False


class ProcessPages(NamedTuple):
    """One process's pages of a batch (ReverseMap.by_process)."""

    pid: int
    pages: slice | npt.NDArray[np.intp]  # which of the batch's PFNs
    vaddrs: npt.NDArray[np.uint64]  # ascending


@dataclass
class RefreshStats:
    processes: int = 0
    read: int = 0  # processes whose pagemap was read this refresh
    gone: int = 0
    excluded: int = 0
    errors: list[str] = field(default_factory=list)


class ReverseMap:
    def __init__(self, process_filter: ProcessFilter, root: HostRoot = HOST,
                 full_every: int = 10) -> None:
        self.filter = process_filter
        self.root = root
        self.full_every = full_every
        self._map = ExtentMap()
        self._procs: dict[int, _Process] = {}
        self._slot_pid = np.zeros(0, dtype=np.int64)  # slot -> pid (0: free)
        self._free_slots: list[int] = []
        self._refreshes = 0

    # --- size ----------------------------------------------------------------------

    @property
    def pages(self) -> int:
        return self._map.pages

    @property
    def extents(self) -> int:
        return self._map.extents

    @property
    def nbytes(self) -> int:
        return self._map.nbytes

    @property
    def pfn(self) -> npt.NDArray[np.uint64]:
        """The PFN of every entry, sorted (a PFN once per process mapping it)."""
        return np.sort(self._map.expand()[0])

    # --- lookups -------------------------------------------------------------------

    def lookup(self, pfns: npt.NDArray[np.uint64]
               ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        """(found, pid, vaddr) for each PFN; pid and vaddr are 0 where not found.

        A page mapped by several processes answers with one of them.
        """
        owner = self._map.owners_of(pfns)
        found = owner != DEAD
        slot = np.where(found, owner >> np.uint64(VPN_BITS), 0).astype(np.intp)
        pid = np.where(found, self._slot_pid[slot], 0)
        vaddr = np.where(found, (owner & VPN_MASK) << np.uint64(PAGE_SHIFT), np.uint64(0))
        return found, pid, vaddr

    def holds(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """Whether the map has an entry for each PFN."""
        return cast(npt.NDArray[np.bool_], self._map.owners_of(pfns) != DEAD)

    def holders_of(self, pfns: npt.NDArray[np.uint64]
                   ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
        """Every process mapping each PFN, as last read: (position in `pfns`, pid) pairs."""
        which, index = self._map.holders(pfns)
        slot = (self._map.owner[index] >> np.uint64(VPN_BITS)).astype(np.intp)
        return which, self._slot_pid[slot]

    def by_process(self, pfns: npt.NDArray[np.uint64]
                   ) -> tuple[npt.NDArray[np.bool_] | None, list[ProcessPages]]:
        """Where the pages of `pfns` are mapped: which of them the map lacks (None when
        none), and for each process the positions in `pfns` of its pages (a slice when
        that is all of them) with their virtual addresses, ascending.

        A page mapped by several processes goes with one of them, as in lookup().
        The usual batch is one process's pages in address order: then the owners,
        (slot << VPN_BITS) | virtual page, ascend, and nothing is sorted or masked.
        """
        owner = self._map.owners_of(pfns)
        missing, index = None, None
        if (owner == DEAD).any():
            found = owner != DEAD
            missing, index = ~found, np.flatnonzero(found)
            owner = owner[index]
        if owner.size == 0:
            return missing, []
        if not _native.ascends(owner, True):  # e.g. huge pages placed out of address order
            index = np.arange(owner.size) if index is None else index
            _native.sort_pairs(owner, index)  # both the method's own arrays
        vaddrs = (owner & VPN_MASK) << np.uint64(PAGE_SHIFT)
        slot_shift = np.uint64(VPN_BITS)
        if owner[0] >> slot_shift == owner[-1] >> slot_shift:  # one process
            bounds = [0, owner.size]
        else:
            bounds = [0, *(np.flatnonzero(np.diff(owner >> slot_shift)) + 1).tolist(), owner.size]
        return missing, [
            ProcessPages(int(self._slot_pid[int(owner[start] >> slot_shift)]),
                         slice(start, end) if index is None else index[start:end],
                         vaddrs[start:end])
            for start, end in pairwise(bounds)]

    def pfns_of_pid(self, pid: int) -> npt.NDArray[np.uint64]:
        proc = self._procs.get(pid)
        if proc is None:
            return np.zeros(0, dtype=np.uint64)
        mine = (self._map.owner >> np.uint64(VPN_BITS)) == np.uint64(proc.slot)
        return np.sort(self._map.expand(cast(npt.NDArray[np.bool_], mine))[0])

    # --- corrections from the movers -------------------------------------------

    def invalidate(self, pfns: npt.NDArray[np.uint64]) -> None:
        """Drop these PFNs' entries (the page moved, vanished or changed owner);
        their processes are re-read at the next refresh."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        if pfns.size:
            self._remove(pfns, np.zeros(pfns.size, dtype=np.bool_))

    def moved(self, old: npt.NDArray[np.uint64], new: npt.NDArray[np.uint64]) -> None:
        """Pages now live at new PFNs (read back from pagemap after the move).

        The entry lookup() returned (the first of its PFN) follows the page;
        other processes mapping the old PFN, and those of pages that vanished
        (new PFN 0), are re-read at the next refresh.
        """
        old = np.asarray(old, dtype=np.uint64)
        new = np.asarray(new, dtype=np.uint64)
        if old.size == 0:
            return
        follows, followers = self._remove(old, new != 0)
        pfns = new[follows]
        # In address order, so pages that moved together to consecutive PFNs merge.
        order = np.argsort(followers, kind="stable")
        self._map.add(*runs(pfns[order], followers[order]))

    def _remove(self, pfns: U64, moving: npt.NDArray[np.bool_]
                ) -> tuple[npt.NDArray[np.bool_], U64]:
        """Take out every entry at `pfns`. Where `moving`, the entry lookup() gives
        follows its page: returns which PFNs have one and their owners; the
        processes of all other entries taken out are marked stale."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        followers = self._map.owners_of(pfns)
        distinct, first = pfns.copy(), np.arange(pfns.size, dtype=np.int64)
        _native.sort_pairs(distinct, first)  # pages of a batch are distinct, in process order
        if not _native.ascends(distinct, True):
            distinct, first = np.unique(pfns, return_index=True)
        where, owners = self._map.remove(distinct)
        at = first[where]
        stale = ~(moving[at] & (owners == followers[at]))
        if stale.any():
            for slot in np.unique(owners[stale] >> np.uint64(VPN_BITS)).tolist():
                if (proc := self._procs.get(int(self._slot_pid[slot]))) is not None:
                    proc.stale = True
        follows = moving & (followers != DEAD)
        return follows, followers[follows]

    # --- refresh ---------------------------------------------------------------------

    def refresh(self) -> RefreshStats:
        """Bring the map up to date with the processes now running."""
        self._refreshes += 1
        stats = RefreshStats()
        pids = task.pids(self.root)
        stats.processes = len(pids)
        alive = set(pids)
        drop = [pid for pid in self._procs if pid not in alive]
        reread: dict[int, tuple[_Process, list[tuple[int, int]]]] = {}
        for pid in pids:
            self._visit(pid, stats, drop, reread)
        self._replace(drop, reread, stats)
        return stats

    def _visit(self, pid: int, stats: RefreshStats, drop: list[int],
               reread: dict[int, tuple[_Process, list[tuple[int, int]]]]) -> None:
        proc = self._procs.get(pid)
        if not task.has_address_space(pid, self.root):  # kernel threads, zombies
            if proc is not None:
                drop.append(pid)
            return
        try:
            if self.filter.excluded(pid):
                stats.excluded += 1
                if proc is not None:
                    drop.append(pid)
                return
            maps = pagemap.read_maps_text(pid, self.root)
            if not maps:  # exited since the readlink
                return
            fingerprint = hash((maps, task.resident_pages(pid, self.root)))
            if proc is not None and not proc.stale and proc.fingerprint == fingerprint and (
                    self._refreshes - proc.read_at < self.full_every):
                return
            runs = pagemap.scannable_runs(pid, maps, self.root)
        except ProcessGoneError:
            stats.gone += 1
            if proc is not None:
                drop.append(pid)
            return
        except KernelFileError as e:
            stats.errors.append(str(e))
            return
        if proc is None:
            proc = _Process(self._new_slot(pid), fingerprint, self._refreshes)
            self._procs[pid] = proc
        proc.fingerprint, proc.read_at, proc.stale = fingerprint, self._refreshes, False
        reread[pid] = (proc, runs)

    def _replace(self, drop: list[int],
                 reread: dict[int, tuple[_Process, list[tuple[int, int]]]],
                 stats: RefreshStats) -> None:
        # The re-read and the exited processes' extents go first, whatever the read
        # finds: a full re-read then never holds the old map and the new one at once.
        gone = np.zeros(self._slot_pid.size, dtype=np.bool_)
        gone[[proc.slot for proc, _ in reread.values()]] = True
        gone[[self._procs[pid].slot for pid in drop if pid in self._procs]] = True
        if gone.any():
            self._map.drop_slots(gone, VPN_BITS)
        new = self._read_processes(reread, drop, stats)
        for pid in dict.fromkeys(drop):
            if pid in self._procs:
                self._release(pid)
        self._map.add(*new)

    def _read_processes(self, reread: dict[int, tuple[_Process, list[tuple[int, int]]]],
                        drop: list[int], stats: RefreshStats
                        ) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
        """The extents of every process in `reread`, sorted by start; a process that fails
        contributes none."""
        buffer = np.empty(READ_PAGES, dtype=np.uint64)
        parts: list[tuple[U64, U64, npt.NDArray[np.uint32]]] = []
        for pid, (proc, page_runs) in reread.items():
            try:
                parts += self._read_process(pid, proc.slot, page_runs, buffer)
                stats.read += 1
            except ProcessGoneError:
                stats.gone += 1
                drop.append(pid)
            except KernelFileError as e:
                stats.errors.append(str(e))
                proc.stale = True
        return _sorted_extents(parts)

    def _read_process(self, pid: int, slot: int, page_runs: list[tuple[int, int]],
                      buffer: U64) -> list[tuple[U64, U64, npt.NDArray[np.uint32]]]:
        """One process's extents, in page order; its pagemap read READ_PAGES at a time."""
        parts = []
        for pieces in _pieces(page_runs, READ_PAGES):
            entries = buffer[:sum(last - first for first, last in pieces)]
            pagemap.read_runs(pid, pieces, entries, self.root)
            start, owner, length = extent_arrays(entries.size)  # the extents are far fewer
            count = _native.pagemap_extents(entries, np.array(pieces, np.uint64).ravel(),
                                            slot << VPN_BITS, BLOCK_PFNS, start, owner, length)
            parts.append((start[:count].copy(), owner[:count].copy(), length[:count].copy()))
        return parts

    def _new_slot(self, pid: int) -> int:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._slot_pid.size
            if slot >= MAX_SLOTS:
                raise KernelFileError("/proc", f"more than {MAX_SLOTS} processes to track")
            self._slot_pid = np.concatenate((self._slot_pid, np.zeros(max(64, slot), np.int64)))
            self._free_slots = list(range(self._slot_pid.size - 1, slot, -1))
        self._slot_pid[slot] = pid
        return slot

    def _release(self, pid: int) -> int:
        proc = self._procs.pop(pid)
        self._slot_pid[proc.slot] = 0
        self._free_slots.append(proc.slot)
        return proc.slot


def _sorted_extents(parts: list[tuple[U64, U64, npt.NDArray[np.uint32]]]
                    ) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
    """The parts' extents joined and sorted by start, one array at a time, the parts of
    each let go once joined: a first build peaks at the extents plus two arrays."""
    starts, owners = [p[0] for p in parts], [p[1] for p in parts]
    lengths = [p[2] for p in parts]
    del parts[:]
    start = _join(starts, np.zeros(0, dtype=np.uint64))
    order = np.argsort(start, kind="stable")
    start = start[order]
    owner = _join(owners, np.zeros(0, dtype=np.uint64))[order]
    length = _join(lengths, np.zeros(0, dtype=np.uint32))[order]
    return start, owner, length


def _join(pieces: list[_A], empty: _A) -> _A:
    joined = np.concatenate(pieces) if pieces else empty
    pieces.clear()
    return joined


def _pieces(page_runs: list[tuple[int, int]], size: int) -> list[list[tuple[int, int]]]:
    """The [first, last) runs cut into groups of at most `size` pages in all."""
    groups: list[list[tuple[int, int]]] = [[]]
    room = size
    for first, last in page_runs:
        while first < last:
            if room == 0:
                groups.append([])
                room = size
            take = min(last - first, room)
            groups[-1].append((first, first + take))
            first += take
            room -= take
    return groups
