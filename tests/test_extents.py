"""The reverse map's extents against a map of one entry per page, on random mappings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierd.movers import _native
from tierd.movers.extents import BLOCK_PFNS, DEAD, NO_EXTENT, ExtentMap, runs

# A process's mapping: chunks of (first PFN, pages) at consecutive virtual pages. PFNs
# from a small range around a block boundary, so chunks overlap as shared pages do,
# touch, and cross the boundary.
_chunks = st.lists(st.tuples(st.integers(BLOCK_PFNS - 40, BLOCK_PFNS + 40),
                             st.integers(1, 24)), min_size=1, max_size=6)
_processes = st.lists(_chunks, min_size=1, max_size=4)


def _pages(processes: list[list[tuple[int, int]]]) -> tuple[np.ndarray, np.ndarray]:
    """(pfn, owner) of every page, process by process in address order."""
    pfns, owners = [], []
    for slot, chunks in enumerate(processes):
        vpn = slot << 20
        for first, count in chunks:
            pfns += range(first, first + count)
            owners += range(vpn, vpn + count)
            vpn += count + (first % 2)  # some chunks touch in address space, some do not
    return np.array(pfns, dtype=np.uint64), np.array(owners, dtype=np.uint64)


def _built(processes: list[list[tuple[int, int]]]) -> ExtentMap:
    extents = ExtentMap()
    extents.add(*runs(*_pages(processes)))
    return extents


def _entries(extents: ExtentMap) -> list[tuple[int, int]]:
    pfns, owners = extents.expand()
    return sorted(zip(pfns.tolist(), owners.tolist(), strict=True))


def _check_shape(extents: ExtentMap) -> None:
    """Sorted by start, and no extent crosses a block boundary."""
    start, length = extents.start, extents.length.astype(np.uint64)
    assert (np.diff(start.astype(np.int64)) >= 0).all()
    assert (length >= 1).all()
    last = start + length - np.uint64(1)
    assert (start // np.uint64(BLOCK_PFNS) == last // np.uint64(BLOCK_PFNS)).all()


@settings(max_examples=300, deadline=None)
@given(processes=_processes)
def test_extents_hold_every_page_once_per_mapping_and_merge_runs(
        processes: list[list[tuple[int, int]]]) -> None:
    pfns, owners = _pages(processes)
    extents = _built(processes)
    _check_shape(extents)
    assert _entries(extents) == sorted(zip(pfns.tolist(), owners.tolist(), strict=True))
    # A run of pages stepping by one in both PFN and address is one extent per block.
    breaks = 1 + sum(1 for i in range(1, pfns.size)
                     if pfns[i] != pfns[i - 1] + 1 or owners[i] != owners[i - 1] + 1
                     or pfns[i] % BLOCK_PFNS == 0)
    assert extents.extents == breaks and extents.pages == pfns.size


def test_a_huge_page_is_one_extent_and_pfn_zero_none() -> None:
    pfns = np.arange(4 * BLOCK_PFNS, 5 * BLOCK_PFNS, dtype=np.uint64)
    extents = ExtentMap()
    extents.add(*runs(pfns, pfns + np.uint64(7 << 20)))
    assert extents.extents == 1 and extents.nbytes == 20
    assert runs(np.zeros(3, np.uint64), np.arange(3, dtype=np.uint64))[0].size == 0


@settings(max_examples=300, deadline=None)
@given(processes=_processes, keys=st.lists(st.integers(BLOCK_PFNS - 50, BLOCK_PFNS + 70),
                                           max_size=30))
def test_lookups_give_an_owner_of_every_mapped_pfn_and_none_elsewhere(
        processes: list[list[tuple[int, int]]], keys: list[int]) -> None:
    pfns, owners = _pages(processes)
    by_pfn: dict[int, set[int]] = {}
    for pfn, owner in zip(pfns.tolist(), owners.tolist(), strict=True):
        by_pfn.setdefault(pfn, set()).add(owner)
    extents = _built(processes)
    got = extents.owners_of(np.array(keys, dtype=np.uint64)).tolist()
    for key, owner in zip(keys, got, strict=True):
        assert owner in by_pfn[key] if key in by_pfn else owner == int(DEAD)
    found = extents.find(np.array(keys, dtype=np.uint64))
    assert ((found == NO_EXTENT) == [k not in by_pfn for k in keys]).all()


@settings(max_examples=300, deadline=None)
@given(processes=_processes, gone=st.sets(st.integers(BLOCK_PFNS - 45, BLOCK_PFNS + 65),
                                          max_size=40),
       moved_to=st.integers(3 * BLOCK_PFNS - 20, 3 * BLOCK_PFNS + 20))
def test_pages_taken_out_split_extents_and_moved_pages_merge(
        processes: list[list[tuple[int, int]]], gone: set[int], moved_to: int) -> None:
    """Take pages out (every mapping of each), then add them back at consecutive new PFNs
    in address order, as pages moved together: the map equals the per-page one."""
    pfns, owners = _pages(processes)
    reference = sorted(zip(pfns.tolist(), owners.tolist(), strict=True))
    extents = _built(processes)
    taken = np.array(sorted(gone), dtype=np.uint64)
    where, owners_out = extents.remove(taken)
    _check_shape(extents)
    out = sorted((int(taken[w]), o) for w, o in zip(where.tolist(), owners_out.tolist(),
                                                    strict=True))
    assert out == [(p, o) for p, o in reference if p in gone]
    kept = [(p, o) for p, o in reference if p not in gone]
    assert _entries(extents) == kept
    # The pages come back at new PFNs in address order: consecutive owners merge.
    followers = np.sort(owners_out)
    new = np.arange(moved_to, moved_to + followers.size, dtype=np.uint64)
    extents.add(*runs(new, followers))
    _check_shape(extents)
    assert _entries(extents) == sorted(kept + list(zip(new.tolist(), followers.tolist(),
                                                       strict=True)))
    assert extents.find(taken).tolist() == [NO_EXTENT] * taken.size


def test_the_native_lookups_check_their_arrays() -> None:
    extents = ExtentMap()
    extents.add(*runs(np.arange(10, 20, dtype=np.uint64), np.arange(10, dtype=np.uint64)))
    start, length, owner = extents.start, extents.length, extents.owner
    pfns = np.array([12, 30], np.uint64)
    index, owners = np.empty(2, np.int64), np.empty(2, np.uint64)
    with pytest.raises(ValueError, match="start, length and owner must match"):
        _native.extent_find(start, length, owner[:0], BLOCK_PFNS, pfns, index, owners)
    with pytest.raises(ValueError, match="index and owners must match pfns"):
        _native.extent_find(start, length, owner, BLOCK_PFNS, pfns, index[:1], owners)
    with pytest.raises(ValueError, match="which and index must match"):
        _native.extent_holders(start, length, BLOCK_PFNS, pfns, index, index[:1].copy())
    # Too little room: the count only, then the pairs with room enough.
    assert _native.extent_holders(start, length, BLOCK_PFNS, pfns, index[:0], index[:0]) == 1
    out = np.empty(3, np.uint64), np.empty(3, np.uint32), np.empty(3, np.uint64)
    with pytest.raises(ValueError, match="touched must ascend"):
        _native.extent_pieces(start, length, owner, np.array([1], np.int64), pfns, *out)
    with pytest.raises(ValueError, match="out arrays must match"):
        _native.extent_pieces(start, length, owner, np.array([0], np.int64), pfns, out[0],
                              out[1][:2], out[2])
    pages = np.arange(1, 4, dtype=np.uint64)
    with pytest.raises(ValueError, match="owners must match pfns"):
        _native.page_extents(pages, pages[:2].copy(), BLOCK_PFNS, out[0], out[2], out[1])
    with pytest.raises(ValueError, match="must hold len"):
        _native.page_extents(pages, pages.copy(), BLOCK_PFNS, out[0][:2], out[2], out[1])
    with pytest.raises(ValueError, match="must not overlap"):
        _native.page_extents(pages, pages.copy(), BLOCK_PFNS, pages, out[2], out[1])
    # Taking PFN 12 out of [10, 20) leaves [10, 12) and [13, 20).
    assert _native.extent_pieces(start, length, owner, np.array([0], np.int64), pfns,
                                 *out) == 2
    assert out[0][:2].tolist() == [10, 13] and out[1][:2].tolist() == [2, 7]
    assert out[2][:2].tolist() == [0, 3]


def test_dropping_slots_takes_out_their_extents_only() -> None:
    pfns = np.arange(10, 20, dtype=np.uint64)
    extents = ExtentMap()
    extents.add(*runs(np.concatenate((pfns, pfns)),
                      np.concatenate((pfns, pfns + np.uint64(1 << 44)))))
    slots = np.array([False, True])
    extents.drop_slots(slots, 44)
    assert _entries(extents) == [(p, p) for p in range(10, 20)]
