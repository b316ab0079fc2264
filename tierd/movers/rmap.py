"""Reverse map PFN -> (pid, vaddr), built from /proc/PID/pagemap, for the PID mover.

Memory: 16 bytes per tracked page, in two parallel arrays sorted by PFN:

    pfn    uint64
    owner  uint64 = (slot << 44) | virtual page number

A slot names one process (a small table slot -> pid); 44 bits of virtual
page number cover a 56-bit user address space (5-level paging), 20 bits of
slot a million processes. The per-process table costs ~200 bytes a process.
A shared page appears once per process mapping it.

Corrections from the movers cost O(batch), not O(map): a page that left
its PFN leaves a tombstone (owner DEAD, its PFN kept, so the arrays stay
sorted), and an entry that followed its page to a new PFN goes to a second,
small pair of sorted arrays, the moved entries, which lookup() reads after
the map. Both fold into the map at the next refresh or when the moved
entries outgrow half the map, so between refreshes a moved page costs 16
more bytes (at most 24 bytes per tracked page), and after each refresh 16.

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
from typing import NamedTuple, cast

import numpy as np
import numpy.typing as npt

from tierd.collectors.processes import ProcessFilter
from tierd.errors import KernelFileError
from tierd.kernel import pagemap, task
from tierd.kernel.pagemap import ProcessGoneError
from tierd.kernel.root import HOST, HostRoot
from tierd.movers import _native
from tierd.vocabulary import PAGE_SHIFT

log = logging.getLogger(__name__)

VPN_BITS = 44
VPN_MASK = np.uint64((1 << VPN_BITS) - 1)
# The top slot is never handed out, so no entry's owner is DEAD.
MAX_SLOTS = (1 << (64 - VPN_BITS)) - 1
DEAD = np.uint64(2**64 - 1)  # the owner of a tombstone: this entry's page left its PFN


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
        self._pfn = np.zeros(0, dtype=np.uint64)  # the map, sorted by PFN, tombstones in it
        self._owner = np.zeros(0, dtype=np.uint64)
        self._dead = 0  # tombstones in the map
        self._moved_pfn = np.zeros(0, dtype=np.uint64)  # entries that followed a move, sorted
        self._moved_owner = np.zeros(0, dtype=np.uint64)
        self._procs: dict[int, _Process] = {}
        self._slot_pid = np.zeros(0, dtype=np.int64)  # slot -> pid (0: free)
        self._free_slots: list[int] = []
        self._refreshes = 0

    # --- size ----------------------------------------------------------------------

    @property
    def pages(self) -> int:
        return self._pfn.size - self._dead + self._moved_pfn.size

    @property
    def nbytes(self) -> int:
        return (self._pfn.nbytes + self._owner.nbytes + self._moved_pfn.nbytes
                + self._moved_owner.nbytes)

    @property
    def pfn(self) -> npt.NDArray[np.uint64]:
        """The PFN of every entry, sorted (a PFN once per process mapping it)."""
        self._compact()
        return self._pfn

    # --- lookups -------------------------------------------------------------------

    def lookup(self, pfns: npt.NDArray[np.uint64]
               ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        """(found, pid, vaddr) for each PFN; pid and vaddr are 0 where not found.

        A page mapped by several processes answers with one of them.
        """
        owner, _ = self._first_owners(pfns)
        found = owner != DEAD
        slot = np.where(found, owner >> np.uint64(VPN_BITS), 0).astype(np.intp)
        pid = np.where(found, self._slot_pid[slot], 0)
        vaddr = np.where(found, (owner & VPN_MASK) << np.uint64(PAGE_SHIFT), np.uint64(0))
        return found, pid, vaddr

    def by_process(self, pfns: npt.NDArray[np.uint64]
                   ) -> tuple[npt.NDArray[np.bool_] | None, list[ProcessPages]]:
        """Where the pages of `pfns` are mapped: which of them the map lacks (None when
        none), and for each process the positions in `pfns` of its pages (a slice when
        that is all of them) with their virtual addresses, ascending.

        A page mapped by several processes goes with one of them, as in lookup().
        The usual batch is one process's pages in address order: then the owners,
        (slot << VPN_BITS) | virtual page, ascend, and nothing is sorted or masked.
        """
        owner, every = self._first_owners(pfns)
        missing, index = None, None
        if not every:
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

    def _first_owners(self, pfns: npt.NDArray[np.uint64]
                      ) -> tuple[npt.NDArray[np.uint64], bool]:
        """The owner of each PFN's first live entry (the map's before the moved ones'),
        DEAD where it has none; and whether every PFN has one."""
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        owner = np.empty(pfns.size, dtype=np.uint64)
        found = _native.first_owners(self._pfn, self._owner, pfns, owner)
        if found < pfns.size and self._moved_pfn.size:
            moved = np.empty_like(owner)
            _native.first_owners(self._moved_pfn, self._moved_owner, pfns, moved)
            owner = np.where(owner == DEAD, moved, owner)
            return owner, not (owner == DEAD).any()
        return owner, found == pfns.size

    def pfns_of_pid(self, pid: int) -> npt.NDArray[np.uint64]:
        proc = self._procs.get(pid)
        if proc is None:
            return np.zeros(0, dtype=np.uint64)
        self._compact()
        mine = (self._owner >> np.uint64(VPN_BITS)) == np.uint64(proc.slot)
        return self._pfn[cast(npt.NDArray[np.bool_], mine)]

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
        pfns = new.copy() if follows.all() else new[follows]  # the map's own, not the caller's
        if self._moved_pfn.size:
            pfns = np.concatenate((self._moved_pfn, pfns))
            followers = np.concatenate((self._moved_owner, followers))
        _native.sort_pairs(pfns, followers)
        self._moved_pfn, self._moved_owner = pfns, followers
        if self._moved_pfn.size > max(4096, self._pfn.size // 2):
            self._compact()

    def _remove(self, pfns: npt.NDArray[np.uint64], moving: npt.NDArray[np.bool_]
                ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.uint64]]:
        """Take out every entry at `pfns`. Where `moving`, the entry lookup() gives
        follows its page: returns which PFNs have one and their owners; the
        processes of all other entries taken out are marked stale.

        In the map entries become tombstones (in C, _native.take_out), so
        the arrays stay sorted and every entry of a PFN there is live or none
        is; the moved entries are fewer, and lose theirs at once.
        """
        pfns = np.ascontiguousarray(pfns)
        moving = np.ascontiguousarray(moving)
        stale = np.zeros(self._slot_pid.size, dtype=np.bool_)
        followers = np.empty(pfns.size, dtype=np.uint64)
        self._dead += _native.take_out(self._pfn, self._owner, pfns, moving, followers,
                                       stale, VPN_BITS)
        if self._moved_pfn.size:  # lookup() answers from these where the map has no entry
            in_map = followers != DEAD
            moved_followers = np.empty_like(followers)
            if _native.take_out(self._moved_pfn, self._moved_owner, pfns,
                                moving & ~in_map, moved_followers, stale, VPN_BITS):
                keep = self._moved_owner != DEAD
                self._moved_pfn, self._moved_owner = self._moved_pfn[keep], self._moved_owner[keep]
            followers = np.where(in_map, followers, moved_followers)
        for slot in np.flatnonzero(stale).tolist():
            if (proc := self._procs.get(int(self._slot_pid[slot]))) is not None:
                proc.stale = True
        follows = followers != DEAD
        return follows, followers if follows.all() else followers[follows]

    def _compact(self) -> None:
        """Fold the tombstones and the moved entries into the map."""
        if self._dead:
            keep = self._owner != DEAD
            self._pfn, self._owner, self._dead = self._pfn[keep], self._owner[keep], 0
        if self._moved_pfn.size:
            self._merge(self._pfn, self._owner, self._moved_pfn, self._moved_owner)
            self._moved_pfn = self._moved_owner = np.zeros(0, dtype=np.uint64)

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
        new_pfns, new_owners = _present_pages(*self._read_processes(reread, drop, stats))
        self._compact()
        cleared = [self._procs[pid].slot for pid in reread if pid not in drop]
        cleared += [self._release(pid) for pid in dict.fromkeys(drop) if pid in self._procs]
        if self._pfn.size and cleared:
            gone = np.zeros(self._slot_pid.size, dtype=np.bool_)
            gone[cleared] = True
            keep = ~gone[(self._owner >> np.uint64(VPN_BITS)).astype(np.intp)]
            self._pfn, self._owner = self._pfn[keep], self._owner[keep]
        if new_pfns.size:
            self._merge(self._pfn, self._owner, new_pfns, new_owners)

    def _read_processes(self, reread: dict[int, tuple[_Process, list[tuple[int, int]]]],
                        drop: list[int], stats: RefreshStats
                        ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64],
                                   npt.NDArray[np.uint64]]:
        """The pagemap entries of every process in `reread`, their runs one after another in
        one array; where each run starts in it (and where the last ends), and the base of
        each run's owners: _present_pages' input.

        One array for all, so the per-entry work runs once, not once per process; a
        process that fails leaves its part all zeros (not present).
        """
        bounds, bases = [0], []
        for proc, runs in reread.values():
            for first, last in runs:
                # owner = base + the entry's index (mod 2**64: the offset can exceed `first`)
                bases.append(((proc.slot << VPN_BITS) + first - bounds[-1]) % (1 << 64))
                bounds.append(bounds[-1] + last - first)
        entries = np.empty(bounds[-1], dtype=np.uint64)
        at = 0
        for pid, (proc, runs) in reread.items():
            part = entries[at:at + sum(last - first for first, last in runs)]
            at += part.size
            try:
                pagemap.read_runs(pid, runs, part, self.root)
                stats.read += 1
            except ProcessGoneError:
                stats.gone += 1
                drop.append(pid)
                part[:] = 0
            except KernelFileError as e:
                stats.errors.append(str(e))
                proc.stale = True
                part[:] = 0
        return entries, np.array(bounds, dtype=np.int64), np.array(bases, dtype=np.uint64)

    def _merge(self, pfns: npt.NDArray[np.uint64], owners: npt.NDArray[np.uint64],
               new_pfns: npt.NDArray[np.uint64], new_owners: npt.NDArray[np.uint64]) -> None:
        """Merge the new entries, sorted by PFN, into the kept ones."""
        if pfns.size == 0:  # a first build: nothing to merge into
            self._pfn, self._owner = new_pfns, new_owners
            return
        # Where each new entry lands in the merged arrays; the kept ones fill the rest
        # (one pass each, where np.insert would repeat the bookkeeping per array).
        at = np.searchsorted(pfns, new_pfns) + np.arange(new_pfns.size)
        kept = np.ones(pfns.size + new_pfns.size, dtype=np.bool_)
        kept[at] = False
        self._pfn = np.empty(kept.size, dtype=np.uint64)
        self._owner = np.empty(kept.size, dtype=np.uint64)
        self._pfn[at], self._pfn[kept] = new_pfns, pfns
        self._owner[at], self._owner[kept] = new_owners, owners

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


def _present_pages(entries: npt.NDArray[np.uint64], bounds: npt.NDArray[np.int64],
                   bases: npt.NDArray[np.uint64]
                   ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """(pfns, owners) of the present entries, sorted by PFN; `entries` is overwritten.

    In C (_native.c): two passes over the entries where numpy needs a dozen,
    each with a temporary as large as the entries. The PFNs land in `entries`, whose
    pages are already faulted in; `owners` is touched only as far as it is filled.
    Both are then cut to size in place (a realloc that shrinks copies nothing), so
    the map holds no buffer for the pages not present.
    """
    owners = np.empty_like(entries)
    found = _native.present_sorted(entries, bounds, bases, owners)
    entries.resize(found, refcheck=False)  # no views of either are left to move
    owners.resize(found, refcheck=False)
    return entries, owners

