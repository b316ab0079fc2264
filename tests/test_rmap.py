"""pagemap/maps readers and the reverse-map cache PFN -> (pid, vaddr)."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierd.collectors.processes import Exclusions, ProcessFilter
from tierd.errors import KernelFileError
from tierd.kernel import _gather, pagemap
from tierd.kernel.numa import move_pages
from tierd.kernel.root import HostRoot
from tierd.movers import _native
from tierd.movers.extents import BLOCK_PFNS, runs
from tierd.movers.rmap import VPN_BITS, ReverseMap

FIXTURES = Path(__file__).parent / "fixtures" / "movers"
ALL = 2**64 - 1  # gather()'s mask keeping every bit
ROOT = HostRoot(FIXTURES)
PID = 4242
PAGE = pagemap.PAGE_SIZE


def test_read_pagemap_decodes_present_swapped_and_file_pages() -> None:
    entries = pagemap.read_pagemap(PID, 16 * PAGE, 8, ROOT)
    pfns = pagemap.pfn_of(entries)
    assert pfns.tolist() == [16, 17, 18, 19, 0, 0, 32, 48]
    assert ((entries & pagemap.EXCLUSIVE) != 0).tolist() == [True] * 4 + [False] * 4
    assert ((entries & pagemap.FILE_SHARED) != 0).tolist() == [False] * 6 + [True] * 2


def test_read_pagemap_past_the_end_reads_not_present() -> None:
    entries = pagemap.read_pagemap(PID, 22 * PAGE, 4, ROOT)
    assert pagemap.pfn_of(entries).tolist() == [32, 48, 0, 0]


def test_read_ranges_reads_touching_ranges_in_one_go_with_the_same_result() -> None:
    ranges = [(16 * PAGE, 18 * PAGE), (18 * PAGE, 20 * PAGE), (22 * PAGE, 26 * PAGE),
              (4 * PAGE, 5 * PAGE)]
    expected = np.concatenate([pagemap.read_pagemap(PID, s, (e - s) // PAGE, ROOT)
                               for s, e in ranges])
    entries = pagemap.read_ranges(PID, ranges, ROOT)
    assert np.array_equal(entries, expected)
    assert pagemap.pfn_of(entries).tolist() == [16, 17, 18, 19, 32, 48, 0, 0, 0]


def test_pfns_of_any_order_with_repeats_and_far_gaps() -> None:
    far = (pagemap.MERGE_GAP_PAGES + 100) * PAGE
    vaddrs = np.array([23 * PAGE + 5, 16 * PAGE, 16 * PAGE + 100, 21 * PAGE, far, 19 * PAGE],
                      dtype=np.uint64)
    assert pagemap.pfns_of(PID, vaddrs, ROOT).tolist() == [48, 16, 16, 0, 0, 19]


def test_pfns_of_sorted_addresses_contiguous_and_with_near_gaps() -> None:
    contiguous = np.arange(16, 20, dtype=np.uint64) * np.uint64(PAGE)
    assert pagemap.pfns_of(PID, contiguous, ROOT).tolist() == [16, 17, 18, 19]
    near_gaps = np.array([16, 19, 21, 23], dtype=np.uint64) * np.uint64(PAGE)
    assert pagemap.pfns_of(PID, near_gaps, ROOT).tolist() == [16, 19, 0, 48]


def test_pagemap_of_a_missing_process_is_process_gone() -> None:
    with pytest.raises(pagemap.ProcessGoneError, match="proc/999/pagemap: process gone"):
        pagemap.read_pagemap(999, 0, 1, ROOT)


def test_unaligned_vaddr_is_refused() -> None:
    with pytest.raises(ValueError, match="not page aligned"):
        pagemap.read_pagemap(PID, 16 * PAGE + 1, 1, ROOT)


def test_read_maps_parses_paths_and_skips_vdso_family() -> None:
    maps = pagemap.read_maps(PID, ROOT)
    assert [m.path for m in maps] == ["", "/usr/lib/libfoo.so", "/dev/zero (deleted)", "[vvar]"]
    assert maps[0].start == 0x10000 and maps[0].npages == 6
    assert maps[1].offset == 0x2000 and maps[1].inode == 1234
    assert [m.path for m in pagemap.scannable(maps)] == [m.path for m in maps[:3]]


def test_malformed_maps_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "proc/7").mkdir(parents=True)
    (tmp_path / "proc/7/maps").write_text("00010000-00016000 rw-p 00000000 00:00 0\nbogus\n")
    with pytest.raises(KernelFileError, match=r"proc/7/maps: line 2: malformed line 'bogus'"):
        pagemap.read_maps(7, HostRoot(tmp_path))


def _maps_line(first: int, last: int, perms: str, path: str = "") -> str:
    return f"{first * PAGE:08x}-{last * PAGE:08x} {perms} 00000000 00:00 0    {path}\n"


def test_scannable_runs_merge_touching_mappings_as_the_mapping_parser_would(
        tmp_path: Path) -> None:
    (tmp_path / "proc/7").mkdir(parents=True)
    (tmp_path / "proc/7/maps").write_text("".join([
        _maps_line(16, 18, "rw-p"), _maps_line(18, 19, "r--p", "/usr/lib/libfoo.so"),
        _maps_line(19, 20, "---p"), _maps_line(20, 22, "rw-p", "/x [vdso] y"),
        _maps_line(33, 34, "r-xp", "[vdso]"), _maps_line(34, 35, "rw-p", "[stack]"),
    ]))
    root = HostRoot(tmp_path)
    runs = pagemap.scannable_runs(7, pagemap.read_maps_text(7, root), root)
    assert runs == [(16, 19), (20, 22), (34, 35)]
    assert runs == pagemap._touching_merged([(m.start // PAGE, m.end // PAGE) for m in
                                             pagemap.scannable(pagemap.read_maps(7, root))])


def test_scannable_runs_name_a_malformed_line() -> None:
    maps = (_maps_line(16, 18, "rw-p") + "bogus\n").encode()
    with pytest.raises(KernelFileError, match=r"proc/7/maps: line 2: malformed line 'bogus'"):
        pagemap.scannable_runs(7, maps, ROOT)


def test_host_root_fspath_is_the_path_it_maps_as_a_string(tmp_path: Path) -> None:
    for root in (HostRoot(), HostRoot(tmp_path), HostRoot(Path(f"{tmp_path}/"))):
        assert root.fspath("/proc/7/maps") == str(root("/proc/7/maps"))


def _own_buffer(npages: int) -> tuple[mmap.mmap, np.ndarray]:
    buf = mmap.mmap(-1, npages * PAGE)
    view = np.frombuffer(buf, dtype=np.uint8)
    view[::PAGE] = 1  # fault every page in
    return buf, view


@pytest.mark.vm
def test_pfns_of_own_pages_match_the_nodes_move_pages_reports() -> None:
    buf, view = _own_buffer(64)
    try:
        base = view.ctypes.data
        vaddrs = base + PAGE * np.arange(64, dtype=np.uint64)
        assert (move_pages(0, vaddrs[:32], np.ones(32)) == 1).all()
        pfns = pagemap.pfns_of(os.getpid(), vaddrs)
        assert (pfns != 0).all()
        node1_start = _node_start_pfn(1)
        assert (pfns[:32] >= node1_start).all() and (pfns[32:] < node1_start).all()
        entries = pagemap.read_pagemap(os.getpid(), base, 64)
        assert np.array_equal(pagemap.pfn_of(entries), pfns)
        assert ((entries & pagemap.EXCLUSIVE) != 0).all()
    finally:
        del view
        buf.close()


def _node_start_pfn(node: int) -> int:
    """Lowest PFN of `node`'s memory blocks (node 1's range lies above node 0's in the lab)."""
    node_dir = Path(f"/sys/devices/system/node/node{node}")
    block_size = int(Path("/sys/devices/system/memory/block_size_bytes").read_text(), 16)
    blocks = [int(p.name.removeprefix("memory")) for p in node_dir.glob("memory[0-9]*")]
    return min(blocks) * block_size // PAGE


# --- the reverse map on the fixture tree ---------------------------------------------------
# /proc/4242 "workload": PFNs 16-19 (anon), 32 (file), 48 (shared with 4243)
# /proc/4243 "postgres: writer": PFNs 40, 41, 48
# /proc/4244 "dbhelper" in /system.slice/db.service/sub: PFNs 44, 45
# /proc/2: a kernel thread (no mappings)


def _rmap(exclusions: Exclusions | None = None, root: HostRoot = ROOT) -> ReverseMap:
    process_filter = ProcessFilter(exclusions or Exclusions(), root, self_pid=1)
    return ReverseMap(process_filter, root, full_every=3)


def test_rmap_maps_every_present_page_of_every_process() -> None:
    rmap = _rmap()
    stats = rmap.refresh()
    assert (stats.processes, stats.read, stats.excluded) == (4, 3, 0)
    assert rmap.pfn.tolist() == [16, 17, 18, 19, 32, 40, 41, 44, 45, 48, 48]
    assert rmap.nbytes == 20 * rmap.extents
    found, pids, vaddrs = rmap.lookup(np.array([17, 32, 41, 44, 99], dtype=np.uint64))
    assert found.tolist() == [True, True, True, True, False]
    assert pids.tolist() == [4242, 4242, 4243, 4244, 0]
    assert vaddrs.tolist() == [17 * PAGE, 22 * PAGE, 17 * PAGE, 16 * PAGE, 0]
    assert rmap.holds(np.array([99, 17, 48, 20], dtype=np.uint64)).tolist() == [
        False, True, True, False]


def test_rmap_never_reads_excluded_processes() -> None:
    rmap = _rmap(Exclusions(comms=("postgres*",), cgroups=("/system.slice/db.service",)))
    stats = rmap.refresh()
    assert stats.excluded == 2
    assert rmap.pfn.tolist() == [16, 17, 18, 19, 32, 48]
    assert rmap.pfns_of_pid(4243).size == 0


def test_rmap_rereads_only_changed_processes_and_drops_exited_ones(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES, tmp_path, symlinks=True, dirs_exist_ok=True)
    root = HostRoot(tmp_path)
    rmap = _rmap(root=root)
    rmap.refresh()
    assert rmap.refresh().read == 0  # nothing changed
    (tmp_path / "proc/4242/statm").write_text("100 7 2 1 0 50 0\n")  # a page faulted in
    shutil.rmtree(tmp_path / "proc/4244")
    stats = rmap.refresh()
    assert stats.read == 1
    assert rmap.pfns_of_pid(4244).size == 0 and 44 not in rmap.pfn.tolist()
    assert rmap.refresh().read == 1  # full_every=3: 4243, last read three refreshes ago


def test_rmap_invalidate_and_moved_repair_entries() -> None:
    rmap = _rmap()
    rmap.refresh()
    rmap.moved(np.array([17], dtype=np.uint64), np.array([60], dtype=np.uint64))
    found, _, vaddrs = rmap.lookup(np.array([17, 60], dtype=np.uint64))
    assert found.tolist() == [False, True] and vaddrs[1] == 17 * PAGE
    rmap.invalidate(np.array([40], dtype=np.uint64))
    assert 40 not in rmap.pfn.tolist()
    assert rmap.refresh().read == 1  # 4243 was marked stale and is read again
    assert 40 in rmap.pfn.tolist()


def test_moves_and_invalidations_between_refreshes_keep_lookups_and_counts_exact() -> None:
    rmap = _rmap()
    rmap.refresh()
    u64 = lambda *v: np.array(v, dtype=np.uint64)  # noqa: E731
    rmap.moved(u64(16, 17), u64(70, 60))
    rmap.moved(u64(60), u64(80))  # moved again before any refresh
    found, pids, vaddrs = rmap.lookup(u64(16, 17, 60, 70, 80, 18))
    assert found.tolist() == [False, False, False, True, True, True]
    assert pids.tolist() == [0, 0, 0, 4242, 4242, 4242]
    assert vaddrs.tolist() == [0, 0, 0, 16 * PAGE, 17 * PAGE, 18 * PAGE]
    assert rmap.pages == 11 and rmap.refresh().read == 0  # followed, nobody stale
    rmap.moved(u64(70), u64(0))  # vanished: its process is read again
    rmap.invalidate(u64(80, 41))
    assert not rmap.lookup(u64(70, 80, 41))[0].any()
    assert rmap.pages == 8
    assert rmap.pfn.tolist() == [18, 19, 32, 40, 44, 45, 48, 48]
    assert rmap.nbytes == 20 * rmap.extents
    assert rmap.refresh().read == 2  # 4242 and 4243


def test_a_moved_shared_page_leaves_no_entry_at_its_old_pfn() -> None:
    rmap = _rmap()
    rmap.refresh()
    assert rmap.pfn.tolist().count(48) == 2  # mapped by 4242 and 4243
    _, pids, _ = rmap.lookup(np.array([48], dtype=np.uint64))
    rmap.moved(np.array([17, 48], dtype=np.uint64), np.array([60, 70], dtype=np.uint64))
    assert 48 not in rmap.pfn.tolist() and 17 not in rmap.pfn.tolist()
    found, moved_pids, _ = rmap.lookup(np.array([60, 70], dtype=np.uint64))
    assert found.all() and moved_pids[1] == pids[0]
    assert rmap.refresh().read == 1  # the other process mapping 48 is read again


def test_by_process_groups_a_batch_by_process_in_address_order() -> None:
    rmap = _rmap()
    rmap.refresh()
    pfns = np.array([41, 16, 99, 19, 40, 17], dtype=np.uint64)
    missing, processes = rmap.by_process(pfns)
    assert missing is not None and missing.tolist() == [False, False, True, False, False, False]
    got = [(pid, pfns[pages].tolist(), (vaddrs // PAGE).tolist())
           for pid, pages, vaddrs in processes]
    assert got == [(4242, [16, 17, 19], [16, 17, 19]), (4243, [40, 41], [16, 17])]
    # The usual batch: one process's pages, in address order: all of them, unsorted.
    missing, processes = rmap.by_process(np.array([16, 17, 18], dtype=np.uint64))
    assert missing is None and processes[0].pages == slice(0, 3)
    assert rmap.by_process(np.array([99], dtype=np.uint64))[1] == []


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(0, 2**20), max_size=40), shift=st.sampled_from([0, 3, 12]),
       max_gap=st.integers(0, 600), mask=st.sampled_from([2**64 - 1, 0xFF0]))
def test_gather_reads_each_keys_entry_and_fills_past_the_end(
        tmp_path_factory: pytest.TempPathFactory, keys: list[int], shift: int,
        max_gap: int, mask: int) -> None:
    path = tmp_path_factory.mktemp("gather") / "entries"
    size = 3000  # entries in the file; indices past it read as the fill
    (np.arange(size, dtype=np.uint64) * np.uint64(3) + np.uint64(1)).tofile(path)
    keys = sorted(k % (4000 << shift) for k in keys)
    out = np.empty(len(keys), dtype=np.uint64)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _gather.gather(fd, np.array(keys, dtype=np.uint64), shift, out, 7, max_gap, mask)
    finally:
        os.close(fd)
    assert out.tolist() == [(3 * (k >> shift) + 1 if k >> shift < size else 7) & mask
                            for k in keys]


def test_gather_reads_nothing_for_keys_out_of_order_and_names_a_failed_reads_offset(
        tmp_path: Path) -> None:
    path = tmp_path / "entries"
    path.write_bytes(bytes(8 * 4 + 3))  # four entries and a piece of one
    fd = os.open(path, os.O_RDONLY)
    try:
        keys, out = np.array([2, 1], dtype=np.uint64), np.full(2, 9, np.uint64)
        assert not _gather.gather(fd, keys, 0, out, 0, 8, ALL)
        assert out.tolist() == [9, 9]
        ascending = np.sort(keys)
        with pytest.raises(ValueError, match="out must not overlap keys"):
            _gather.gather(fd, ascending, 0, ascending, 0, 8, ALL)
        with pytest.raises(OSError, match="read ends inside an entry") as raised:
            _gather.gather(fd, np.array([4], np.uint64), 0, np.empty(1, np.uint64), 0, 8, ALL)
        assert raised.value.filename == 8 * 4 + 3
    finally:
        os.close(fd)
    with pytest.raises(OSError) as raised:
        _gather.gather(fd, np.array([1], np.uint64), 0, np.empty(1, np.uint64), 0, 8, ALL)
    assert raised.value.errno == errno.EBADF and raised.value.filename == 8


# Pairs as the movers sort them: runs where key and value both step by one (huge
# pages), anywhere in the key space, in any order, overlapping at times.
_pair_runs = st.lists(st.tuples(st.integers(0, 2**64 - 1) | st.integers(0, 60),
                                st.integers(0, 2**63), st.integers(1, 9)), max_size=8)


@settings(max_examples=300, deadline=None)
@given(runs=_pair_runs)
def test_sort_pairs_sorts_by_key_with_each_value_alongside(
        runs: list[tuple[int, int, int]]) -> None:
    pairs = [((key + i) % 2**64, value + i) for key, value, length in runs for i in range(length)]
    keys = np.array([k for k, _ in pairs], dtype=np.uint64)
    values = np.array([v for _, v in pairs], dtype=np.uint64)
    _native.sort_pairs(keys, values)
    assert keys.tolist() == sorted(k for k, _ in pairs)
    assert sorted(zip(keys.tolist(), values.tolist(), strict=True)) == sorted(pairs)
    assert _native.ascends(keys, False)
    assert _native.ascends(keys, True) == (len({k for k, _ in pairs}) == len(pairs))


def test_ascends_and_sort_pairs_check_their_arrays() -> None:
    assert _native.ascends(np.zeros(0, np.uint64), True)
    assert not _native.ascends(np.array([2, 1], np.uint64), False)
    keys = np.arange(4, dtype=np.uint64)
    with pytest.raises(ValueError, match="values must hold as many items as keys"):
        _native.sort_pairs(keys, np.zeros(3, np.uint64))
    with pytest.raises(ValueError, match="values must not overlap keys"):
        _native.sort_pairs(keys, keys)


# Pagemap entries of a few virtual page runs: present or not, PFNs that step by one
# at times and cross a block boundary, swapped entries (bit 62) with PFN bits set.
_entry = st.one_of(st.integers(BLOCK_PFNS - 6, BLOCK_PFNS + 6).map(lambda pfn: (1 << 63) | pfn),
                   st.just(0), st.just((1 << 62) | 515), st.just(1 << 63))
_page_runs = st.lists(st.tuples(st.integers(0, 40), st.lists(_entry, max_size=12)),
                      min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(page_runs=_page_runs)
def test_pagemap_extents_match_the_extents_of_the_pages_numpy_finds(
        page_runs: list[tuple[int, list[int]]]) -> None:
    bounds, vpn = [], 0
    for gap, entries in page_runs:
        vpn += gap
        bounds.append((vpn, vpn + len(entries)))
        vpn += len(entries)
    entries = np.array([e for _, run in page_runs for e in run], dtype=np.uint64)
    base = 3 << VPN_BITS
    owners = base + np.concatenate([np.arange(a, b, dtype=np.uint64) for a, b in bounds])
    # Stable by start, as runs() sorts: the native build leaves the order to the caller.
    expected = runs(pagemap.pfn_of(entries.copy()), owners)
    start, owner = np.empty(entries.size, np.uint64), np.empty(entries.size, np.uint64)
    length = np.empty(entries.size, np.uint32)
    count = _native.pagemap_extents(entries, np.array(bounds, np.uint64).ravel(), base,
                                    BLOCK_PFNS, start, owner, length)
    order = np.argsort(start[:count], kind="stable")
    got = (start[:count][order], owner[:count][order], length[:count][order])
    for want, have in zip(expected, got, strict=True):
        assert have.tolist() == want.tolist()


def test_pagemap_extents_check_their_arrays() -> None:
    entries = np.full(4, (1 << 63) | 7, np.uint64)
    out = np.empty(4, np.uint64), np.empty(4, np.uint64), np.empty(4, np.uint32)
    for bounds in ([0, 3], [0, 5], [4, 0, 0, 8], [0, 2, 2]):
        with pytest.raises(ValueError, match="bounds must be"):
            _native.pagemap_extents(entries, np.array(bounds, np.uint64), 0, 512, *out)
    with pytest.raises(ValueError, match="must hold len"):
        _native.pagemap_extents(entries, np.array([0, 4], np.uint64), 0, 512,
                                np.empty(3, np.uint64), out[1], out[2])
    with pytest.raises(ValueError, match="must not overlap"):
        _native.pagemap_extents(entries, np.array([0, 4], np.uint64), 0, 512,
                                entries, out[1], out[2])
    with pytest.raises(TypeError, match="length: expected a 1-d array of uint32"):
        _native.pagemap_extents(entries, np.array([0, 4], np.uint64), 0, 512,
                                out[0], out[1], np.empty(4, np.uint64))


@pytest.mark.vm
def test_rmap_finds_a_real_process_pages_and_tracks_them_after_a_move() -> None:
    buf, view = _own_buffer(64)
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        base = view.ctypes.data
        vaddrs = base + PAGE * np.arange(64, dtype=np.uint64)
        pfns = pagemap.pfns_of(os.getpid(), vaddrs)
        # Exclude nobody but the test runner's own child: the map must hold our pages.
        rmap = ReverseMap(ProcessFilter(Exclusions(pids=(child.pid,)), self_pid=0))
        stats = rmap.refresh()
        assert stats.read >= 1 and not stats.errors
        found, pids, got = rmap.lookup(pfns)
        assert found.all() and (pids == os.getpid()).all()
        assert np.array_equal(got, vaddrs)
        assert rmap.pfns_of_pid(child.pid).size == 0
        assert (move_pages(0, vaddrs, np.ones(64)) == 1).all()
        rmap.refresh()  # resident count unchanged, maps unchanged: stale until told
        rmap.invalidate(pfns)
        rmap.refresh()
        found, _, _ = rmap.lookup(pagemap.pfns_of(os.getpid(), vaddrs))
        assert found.all()
    finally:
        if child:
            child.kill()
        del view
        buf.close()


# --- the reverse map on trees written by the tests -----------------------------------------


def _process(root: Path, pid: int, runs: list[tuple[int, int]], pfns: dict[int, int],
             flags: int = 1 << 63) -> None:
    """/proc/PID with one mapping per [first, last) page run and these page -> PFN entries."""
    proc = root / f"proc/{pid}"
    proc.mkdir(parents=True)
    (proc / "exe").symlink_to("/usr/bin/fixture-workload")  # a user process: it has memory
    (proc / "maps").write_text("".join(_maps_line(f, la, "rw-p") for f, la in runs))
    (proc / "statm").write_text(f"100 {len(pfns)} 0 0 0 0 0\n")
    entries = np.zeros(max(la for _, la in runs), dtype=np.uint64)
    for page, pfn in pfns.items():
        entries[page] = np.uint64(flags | pfn)
    entries.tofile(proc / "pagemap")


def test_rmap_owners_over_runs_with_nothing_present_and_across_processes(tmp_path: Path) -> None:
    # pid 7's runs at pages 16, 64 and 96 have nothing present; pid 8's one run starts
    # below pid 7's total pages, so its base wraps below zero.
    _process(tmp_path, 7, [(16, 19), (32, 36), (64, 66), (80, 83), (96, 98)],
             {33: 100, 35: 101, 80: 102})
    _process(tmp_path, 8, [(2, 5)], {3: 99, 4: 103})
    rmap = _rmap(root=HostRoot(tmp_path))
    assert rmap.refresh().read == 2
    found, pids, vaddrs = rmap.lookup(np.arange(99, 104, dtype=np.uint64))
    assert found.all() and pids.tolist() == [8, 7, 7, 7, 8]
    assert (vaddrs // PAGE).tolist() == [3, 33, 35, 80, 4]


def test_rmap_skips_kernel_threads_and_drops_a_process_that_lost_its_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _process(tmp_path, 7, [(16, 18)], {16: 50})
    _process(tmp_path, 8, [(16, 18)], {16: 60})
    (tmp_path / "proc/2").mkdir()  # a kernel thread: no exe; its maps are never opened
    opened = []
    read_maps_text = pagemap.read_maps_text
    monkeypatch.setattr(pagemap, "read_maps_text",
                        lambda pid, root: opened.append(pid) or read_maps_text(pid, root))
    rmap = _rmap(root=HostRoot(tmp_path))
    assert rmap.refresh().read == 2 and opened == [7, 8]
    (tmp_path / "proc/8/exe").unlink()  # a zombie: exe no longer resolves
    rmap.refresh()
    assert rmap.pfn.tolist() == [50] and rmap.pfns_of_pid(8).size == 0


def test_rmap_leaves_out_pfns_read_as_zero(tmp_path: Path) -> None:
    _process(tmp_path, 7, [(16, 20)], {16: 0, 17: 0, 18: 40})  # present, PFN hidden
    _process(tmp_path, 8, [(16, 18)], {16: 0, 17: 0})
    rmap = _rmap(root=HostRoot(tmp_path))
    rmap.refresh()
    assert rmap.pfn.tolist() == [40] and rmap.nbytes == 20


def test_rmap_keeps_nothing_of_a_process_whose_read_fails_midway(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _process(tmp_path, 7, [(16, 20)], {16: 50, 17: 51})
    _process(tmp_path, 8, [(16, 20)], {16: 60})
    read_runs = pagemap.read_runs

    def fail_for_7(pid: int, runs: list[tuple[int, int]], out: np.ndarray,
                   root: HostRoot) -> None:
        read_runs(pid, runs, out, root)
        if pid == 7:
            raise KernelFileError(f"/proc/{pid}/pagemap", "I/O error")

    monkeypatch.setattr(pagemap, "read_runs", fail_for_7)
    rmap = _rmap(root=HostRoot(tmp_path))
    stats = rmap.refresh()
    assert stats.read == 1 and stats.errors == ["/proc/7/pagemap: I/O error"]
    assert rmap.pfn.tolist() == [60]
    monkeypatch.setattr(pagemap, "read_runs", read_runs)
    assert rmap.refresh().read == 1  # 7 was left stale: read again
    assert rmap.pfn.tolist() == [50, 51, 60]


def test_rmap_rereads_a_process_whose_maps_changed(tmp_path: Path) -> None:
    _process(tmp_path, 7, [(16, 20)], {16: 50})
    rmap = _rmap(root=HostRoot(tmp_path))
    rmap.refresh()
    maps = tmp_path / "proc/7/maps"
    maps.write_text(maps.read_text() + _maps_line(32, 33, "---p"))
    assert rmap.refresh().read == 1
    assert rmap.refresh().read == 0
