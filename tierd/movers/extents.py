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
(O(extents) per change, plus the pages of the extents it splits).
"""

from __future__ import annotations

from itertools import pairwise
from typing import TypeVar

import numpy as np
import numpy.typing as npt

BLOCK_PFNS = 512  # a PMD-size folio: the longest extent
NO_EXTENT = -1
DEAD = np.uint64(2**64 - 1)  # the owner of a PFN no extent holds
# PFNs taken out per step of remove(): bounds the pages of the extents it rebuilds.
REMOVE_CHUNK = 1 << 16

U64 = npt.NDArray[np.uint64]
_A = TypeVar("_A", npt.NDArray[np.uint64], npt.NDArray[np.uint32])


def runs(pfns: U64, owners: U64) -> tuple[U64, U64, npt.NDArray[np.uint32]]:
    """The pages (pfns[i] mapped at owners[i], in the given order) as extents, sorted by
    start: a run continues while both the PFN and the owner go up by one, and ends
    at a block boundary. PFN 0 is never a page."""
    keep = pfns != 0
    if not keep.all():
        pfns, owners = pfns[keep], owners[keep]
    if pfns.size == 0:
        return _empty()
    one = np.uint64(1)
    breaks = np.ones(pfns.size, dtype=np.bool_)
    breaks[1:] = ((pfns[1:] != pfns[:-1] + one) | (owners[1:] != owners[:-1] + one)
                  | (pfns[1:] % np.uint64(BLOCK_PFNS) == 0))
    first = np.flatnonzero(breaks)
    lengths = np.diff(np.append(first, pfns.size)).astype(np.uint32)
    starts, heads = pfns[first], owners[first]
    order = np.argsort(starts, kind="stable")
    return starts[order], heads[order], lengths[order]


def _empty() -> tuple[U64, U64, npt.NDArray[np.uint32]]:
    return (np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64),
            np.zeros(0, dtype=np.uint32))


def _merged(old: _A, new: _A, at: npt.NDArray[np.intp], kept: npt.NDArray[np.bool_]) -> _A:
    out = np.empty(kept.size, dtype=old.dtype)
    out[at], out[kept] = new, old
    return out


class ExtentMap:
    """A multiset of extents, sorted by start PFN (see the module's docstring)."""

    def __init__(self) -> None:
        self.start, self.owner, self.length = _empty()

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
        pfns = np.asarray(pfns, dtype=np.uint64)
        at = np.searchsorted(self.start, pfns, side="right").astype(np.intp) - 1
        found = np.full(pfns.size, NO_EXTENT, dtype=np.intp)
        block = pfns - pfns % np.uint64(BLOCK_PFNS)
        todo = np.flatnonzero(at >= 0)
        while todo.size:  # at most the extents starting in one block before the PFN
            i, p = at[todo], pfns[todo]
            hit = self.start[i] + self.length[i] > p
            found[todo[hit]] = i[hit]
            todo = todo[~hit & (i > 0)]
            at[todo] -= 1
            todo = todo[self.start[at[todo]] >= block[todo]]
        return found

    def owners_of(self, pfns: U64) -> U64:
        """The owner of each PFN in the extent find() gives, DEAD where none holds it."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        index = self.find(pfns)
        hit = index != NO_EXTENT
        owners = np.full(pfns.size, DEAD, dtype=np.uint64)
        i = index[hit]
        owners[hit] = self.owner[i] + (pfns[hit] - self.start[i])
        return owners

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
        pfns = np.asarray(pfns, dtype=np.uint64)
        block = pfns - pfns % np.uint64(BLOCK_PFNS)
        low = np.searchsorted(self.start, block, side="left").astype(np.intp)
        high = np.searchsorted(self.start, pfns, side="right").astype(np.intp)
        counts = high - low
        which = np.repeat(np.arange(pfns.size), counts)
        index = (np.arange(int(counts.sum()), dtype=np.intp)
                 - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(low, counts))
        hit = self.start[index] + self.length[index] > pfns[which]
        return which[hit], index[hit]

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
        owner.

        In steps of about REMOVE_CHUNK PFNs, cut between blocks, so an extent changes in
        one step only and the map is rebuilt once.
        """
        pfns = np.asarray(pfns, dtype=np.uint64)
        gone = np.zeros(self.start.size, dtype=np.bool_)
        parts: list[tuple[U64, U64, npt.NDArray[np.uint32]]] = [_empty()]
        positions, owners = [np.zeros(0, dtype=np.intp)], [np.zeros(0, dtype=np.uint64)]
        blocks = pfns // np.uint64(BLOCK_PFNS)
        cuts = [*np.searchsorted(blocks, blocks[::REMOVE_CHUNK]).tolist(), pfns.size]
        for low, high in pairwise(cuts):
            chunk = pfns[low:high]
            which, index = self.holders(chunk)
            positions.append(which + low)
            owners.append(self.owner[index] + (chunk[which] - self.start[index]))
            touched = np.zeros(self.start.size, dtype=np.bool_)
            touched[index] = True
            gone |= touched
            page_pfns, page_owners = self.expand(touched)
            at = np.minimum(np.searchsorted(chunk, page_pfns), chunk.size - 1)
            left = chunk[at] != page_pfns
            parts.append(runs(page_pfns[left], page_owners[left]))
        self.keep(~gone)
        start, owner, length = (np.concatenate(p) for p in zip(*parts, strict=True))
        order = np.argsort(start, kind="stable")
        self.add(start[order], owner[order], length[order])
        return np.concatenate(positions), np.concatenate(owners)

    def drop_slots(self, slots: npt.NDArray[np.bool_], vpn_bits: int) -> None:
        """Take out every extent whose owner's slot `slots` flags."""
        if self.start.size:
            self.keep(~slots[(self.owner >> np.uint64(vpn_bits)).astype(np.intp)])
