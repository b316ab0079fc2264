"""Runs of consecutive PFNs mapped at consecutive virtual pages: the reverse map's storage.

An extent is (start PFN, owner, length): PFNs start .. start + length - 1
are mapped at the owner's virtual pages owner .. owner + length - 1 (an
owner is (slot << VPN_BITS) | virtual page, tierd.movers.rmap). A THP is one
extent of 512 pages, a run of pages the buddy allocator handed out in order
one extent, so a host's map needs far fewer entries than pages: 20 bytes an
extent where a page each costs 16.

No extent crosses a BLOCK_PFNS-aligned boundary: the extents that may hold
a PFN are then those starting in its block at or before it, a short
backward walk from a binary search even where shared pages make extents
overlap. The arrays are sorted by start PFN; every change builds new ones
(O(extents) per change, plus the pages it takes out). The per-page loops are C
(tierd.movers._native).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

from tierd.movers import _native

BLOCK_PFNS = 512  # a PMD-size folio: the longest extent
NO_EXTENT = -1
DEAD = np.uint64(2**64 - 1)  # the owner of a PFN no extent holds

U64 = npt.NDArray[np.uint64]
_A = TypeVar("_A", npt.NDArray[np.uint64], npt.NDArray[np.uint32])


def runs(pfns: U64, owners: U64) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
    """The pages (pfns[i] mapped at owners[i], in the given order) as extents, sorted by
    start: a run continues while both the PFN and the owner go up by one, and ends
    at a block boundary. PFN 0 is never a page."""
    pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
    owners = np.ascontiguousarray(owners, dtype=np.uint64)
    start, owner, length = extent_arrays(pfns.size)
    count = _native.page_extents(pfns, owners, BLOCK_PFNS, start, owner, length)
    order = np.argsort(start[:count], kind="stable")
    return start[:count][order], owner[:count][order], length[:count][order]


def extent_arrays(size: int = 0) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
    """Uninitialized (start, owner, length) arrays for `size` extents: what the C loops
    write into (pages never written cost no memory)."""
    return (np.empty(size, dtype=np.uint64), np.empty(size, dtype=np.uint64),
            np.empty(size, dtype=np.uint32))


def _merged(old: _A, new: _A, at: npt.NDArray[np.intp], kept: npt.NDArray[np.bool_]) -> _A:
    out = np.empty(kept.size, dtype=old.dtype)
    out[at], out[kept] = new, old
    return out


class ExtentMap:
    """A multiset of extents, sorted by start PFN (see the module's docstring)."""

    def __init__(self) -> None:
        self.start, self.owner, self.length = extent_arrays()

    @property
    def extents(self) -> int:
        return self.start.size

    @property
    def pages(self) -> int:
        return int(self.length.sum(dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.start.nbytes + self.owner.nbytes + self.length.nbytes

    # --- lookups ---------------------------------------------------------------------

    def find(self, pfns: U64) -> npt.NDArray[np.intp]:
        """For each PFN the index of an extent holding it (the last by start), or NO_EXTENT."""
        return self._found(pfns)[0]

    def owners_of(self, pfns: U64) -> U64:
        """The owner of each PFN in the extent find() gives, DEAD where none holds it."""
        return self._found(pfns)[1]

    def _found(self, pfns: U64) -> tuple[npt.NDArray[np.intp], U64]:
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        index = np.empty(pfns.size, dtype=np.intp)
        owners = np.empty(pfns.size, dtype=np.uint64)
        _native.extent_find(self.start, self.length, self.owner, BLOCK_PFNS, pfns, index, owners)
        return index, owners

    def expand(self, which: npt.NDArray[np.bool_] | None = None) -> tuple[U64, U64]:
        """(pfn, owner) of every page of the extents (or of those `which` selects), extent
        by extent."""
        start, owner, length = self.start, self.owner, self.length
        if which is not None:
            start, owner, length = start[which], owner[which], length[which]
        lengths = length.astype(np.intp)
        offsets = (np.arange(int(lengths.sum()), dtype=np.intp)
                   - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.uint64)
        return np.repeat(start, lengths) + offsets, np.repeat(owner, lengths) + offsets

    def holders(self, pfns: U64) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Every (position in `pfns`, extent) pair where the extent holds that PFN."""
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        room = pfns.size  # mostly one holder a PFN; more where pages are shared
        while True:
            which, index = np.empty(room, dtype=np.intp), np.empty(room, dtype=np.intp)
            pairs = _native.extent_holders(self.start, self.length, BLOCK_PFNS, pfns, which,
                                           index)
            if pairs <= room:
                return which[:pairs], index[:pairs]
            room = pairs

    # --- changes -----------------------------------------------------------------------

    def add(self, start: U64, owner: U64, length: npt.NDArray[np.uint32]) -> None:
        """Merge extents (sorted by start) in."""
        if start.size == 0:
            return
        if self.start.size == 0:
            self.start, self.owner, self.length = start, owner, length
            return
        # Where each new extent lands in the merged arrays; the kept ones fill the rest.
        at = np.searchsorted(self.start, start, side="right") + np.arange(start.size)
        kept = np.ones(self.start.size + start.size, dtype=np.bool_)
        kept[at] = False
        self.start = _merged(self.start, start, at, kept)
        self.owner = _merged(self.owner, owner, at, kept)
        self.length = _merged(self.length, length, at, kept)

    def keep(self, which: npt.NDArray[np.bool_]) -> None:
        """Keep only the extents `which` selects."""
        if not which.all():  # one array at a time: the old one goes before the next is cut
            self.start = self.start[which]
            self.owner = self.owner[which]
            self.length = self.length[which]

    def remove(self, pfns: U64) -> tuple[npt.NDArray[np.intp], U64]:
        """Take the (sorted, distinct) PFNs out of every extent holding them; an extent
        splits around them. Returns each page taken out: its position in `pfns` and its
        owner."""
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        which, index = self.holders(pfns)
        owners = self.owner[index] + (pfns[which] - self.start[index])
        touched = np.zeros(self.start.size, dtype=np.bool_)
        touched[index] = True
        at = np.flatnonzero(touched)
        room = at.size + index.size  # a piece before each PFN taken out, one after
        start, owner, length = extent_arrays(room)
        pieces = _native.extent_pieces(self.start, self.length, self.owner, at, pfns, start,
                                       length, owner)
        self.keep(~touched)
        order = np.argsort(start[:pieces], kind="stable")
        self.add(start[:pieces][order], owner[:pieces][order], length[:pieces][order])
        return which, owners

    def drop_slots(self, slots: npt.NDArray[np.bool_], vpn_bits: int) -> None:
        """Take out every extent whose owner's slot `slots` flags."""
        if self.start.size:
            self.keep(~slots[(self.owner >> np.uint64(vpn_bits)).astype(np.intp)])
