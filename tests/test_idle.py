"""The idle-page collector and the per-PFN files it reads (kpageflags, page_idle)."""

from __future__ import annotations

import mmap
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lab.tlb import drop_tlb
from tierd.collectors import idle
from tierd.collectors.evidence import IDLE_AGE_MAX, UNTRACKED
from tierd.collectors.idle import IdleCollector, NodeIdleStats, Pacer, chunks
from tierd.collectors.idle import probe as idle_probe
from tierd.collectors.topology import read_topology
from tierd.errors import KernelFileError, TierdError
from tierd.kernel import kpageflags as kpf
from tierd.kernel import pagemap
from tierd.kernel.nodes import MEMORY_DIR
from tierd.kernel.page_idle import BITMAP, PFNS_PER_WORD, IdleBitmap, unpack
from tierd.kernel.root import HostRoot
from tierd.vocabulary import State


def _write_u64(root: Path, kernel_path: str, values: np.ndarray) -> None:
    path = root / kernel_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.asarray(values, dtype=np.uint64).tobytes())


# --- /proc/kpageflags and friends ---------------------------------------------


def test_kpageflags_reads_a_range_and_fills_past_the_end_as_holes(tmp_path: Path) -> None:
    flags = np.arange(100, dtype=np.uint64) << np.uint64(32)
    _write_u64(tmp_path, kpf.KPAGEFLAGS, flags)
    with kpf.kpageflags(HostRoot(tmp_path)) as f:
        assert np.array_equal(f.read(10, 5), flags[10:15])
        tail = f.read(95, 10)
    assert np.array_equal(tail[:5], flags[95:])
    assert (tail[5:] == kpf.mask(kpf.KPF_NOPAGE)).all()


def test_kpagecount_and_kpagecgroup_fill_with_zero(tmp_path: Path) -> None:
    _write_u64(tmp_path, kpf.KPAGECOUNT, np.full(4, 3))
    _write_u64(tmp_path, kpf.KPAGECGROUP, np.full(4, 77))
    root = HostRoot(tmp_path)
    with kpf.kpagecount(root) as count, kpf.kpagecgroup(root) as cgroup:
        assert count.read(2, 4).tolist() == [3, 3, 0, 0]
        assert cgroup.read(0, 2).tolist() == [77, 77]


def test_read_into_reuses_the_callers_buffer(tmp_path: Path) -> None:
    _write_u64(tmp_path, kpf.KPAGEFLAGS, np.arange(64))
    buf = np.zeros(16, dtype=np.uint64)
    with kpf.kpageflags(HostRoot(tmp_path)) as f:
        assert f.read_into(48, buf) == 16
        assert buf[0] == 48
        assert f.read_into(56, buf) == 8
    assert buf[:8].tolist() == list(range(56, 64))


def test_flag_helpers_select_bits() -> None:
    flags = np.array(
        [0, 1 << kpf.KPF_LRU, (1 << kpf.KPF_LRU) | (1 << kpf.KPF_MLOCKED),
         1 << kpf.KPF_UNEVICTABLE, 1 << kpf.KPF_NOPAGE],
        dtype=np.uint64,
    )
    assert kpf.has_any(flags, kpf.KPF_LRU).tolist() == [False, True, True, False, False]
    assert kpf.unmovable(flags).tolist() == [False, False, True, True, True]
    assert kpf.mask(kpf.KPF_MLOCKED) == np.uint64(1 << 33)


def test_missing_kpageflags_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(KernelFileError, match=r"proc/kpageflags: missing"):
        kpf.read_flags(0, 8, HostRoot(tmp_path))


def test_a_failing_read_names_file_and_offset(tmp_path: Path) -> None:
    (tmp_path / "proc" / "kpageflags").mkdir(parents=True)  # read() gives EISDIR
    with pytest.raises(KernelFileError, match=r"kpageflags: offset 0x40: Is a directory"):
        kpf.read_flags(8, 8, HostRoot(tmp_path))


def test_a_truncated_entry_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "proc" / "kpageflags"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0" * 12)
    with pytest.raises(KernelFileError, match=r"offset 0xc: read ends inside an entry"):
        kpf.read_flags(0, 4, HostRoot(tmp_path))


def test_per_pfn_files_share_one_fd_each_closed_once_and_name_the_file(tmp_path: Path) -> None:
    root = HostRoot(tmp_path)
    with pytest.raises(KernelFileError, match=r"page_idle/bitmap: missing \(kernel built "
                       r"without CONFIG_IDLE_PAGE_TRACKING\)"):
        IdleBitmap(root).read_words(0, np.zeros(1, dtype=np.uint64))
    _write_u64(tmp_path, kpf.KPAGEFLAGS, np.arange(8))
    with kpf.kpageflags(root) as flags:
        flags.read(0, 2)
        fd = flags._open()
        assert flags.read(6, 2).tolist() == [6, 7] and flags._open() == fd  # reused
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the with block
    flags.close()  # and closing again is harmless


# --- the idle-page collector on a fixture tree -------------------------------------------
#
# The fixture's bitmap is a plain file: what mark() writes stays there. Between
# mark() and collect() (the collector's sleep hook) `FakeKernel.interval`
# does what the kernel would: a page that is not a user LRU page, or is a
# large folio's tail, never reads back idle; an accessed page reads back 0.
# `FakeKernel.end_at` ends the bitmap where the kernel's would (its last PFN
# rounded down to a word): reads hit EOF there, writes stop short.


class EndingBitmap(IdleBitmap):
    """The bitmap file, but a write stops at `end_word` (a file would grow instead)."""

    def __init__(self, root: HostRoot, end_word: int) -> None:
        super().__init__(root)
        self.end_word = end_word
        self.cut_writes = 0  # writes that ran past the end

    def write_words(self, first_word: int, words: np.ndarray) -> int:
        room = max(0, self.end_word - first_word)
        self.cut_writes += words.size > room
        return super().write_words(first_word, words[:room])

FIXTURE = Path(__file__).parent / "fixtures" / "idle" / "two-node"
NODE0 = (100, 1100)  # [start, end) PFNs of node 0: both edges inside a 64-PFN word
NODE1 = (2048, 3072)
MAX_PFN = 4096
LRU_ANON = (1 << kpf.KPF_LRU) | (1 << kpf.KPF_ANON) | (1 << kpf.KPF_MMAP)
LRU_FILE = (1 << kpf.KPF_LRU) | (1 << kpf.KPF_MMAP)
THP_HEAD = LRU_ANON | (1 << kpf.KPF_THP) | (1 << kpf.KPF_COMPOUND_HEAD)
THP_TAIL = LRU_ANON | (1 << kpf.KPF_THP) | (1 << kpf.KPF_COMPOUND_TAIL)


class FakeKernel:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        shutil.copytree(FIXTURE, self.root)
        self.flags = np.zeros(MAX_PFN, dtype=np.uint64)  # kernel pages: untracked
        self.accessed: set[int] = set()
        self.bitmap_path = self.root / BITMAP.lstrip("/")
        self.bitmap_path.parent.mkdir(parents=True)
        self.bitmap_path.write_bytes(bytes(MAX_PFN // 8))
        self.end_word = MAX_PFN // PFNS_PER_WORD

    def end_at(self, max_pfn: int) -> None:
        """The kernel's last PFN is `max_pfn` - 1: the bitmap holds only its whole words."""
        self.end_word = max_pfn // PFNS_PER_WORD
        self.bitmap_path.write_bytes(bytes(self.end_word * 8))

    def set_block_size(self, size: int) -> None:
        path = self.root / MEMORY_DIR.lstrip("/") / "block_size_bytes"
        path.parent.mkdir(parents=True)
        path.write_text(f"{size:x}\n")

    def set_flags(self, start: int, stop: int, flags: int) -> None:
        self.flags[start:stop] = flags

    def thp(self, head: int, pages: int = 512) -> None:
        self.flags[head] = THP_HEAD
        self.flags[head + 1:head + pages] = THP_TAIL

    def bits(self) -> np.ndarray:
        words = np.frombuffer(self.bitmap_path.read_bytes(), dtype=np.uint64)
        return np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)

    def interval(self, seconds: float) -> None:
        bits = self.bits()
        trackable = ((self.flags & np.uint64(1 << kpf.KPF_LRU)) != 0) & (
            (self.flags & np.uint64(1 << kpf.KPF_COMPOUND_TAIL)) == 0)
        bits &= trackable[:bits.size]
        bits[sorted(self.accessed)] = False
        words = np.packbits(bits, bitorder="little").view(np.uint64)
        self.bitmap_path.write_bytes(words.tobytes())

    def collector(self, **kwargs: object) -> IdleCollector:
        _write_u64(self.root, kpf.KPAGEFLAGS, self.flags)
        mapped = (self.flags & np.uint64(1 << kpf.KPF_MMAP)) != 0
        _write_u64(self.root, kpf.KPAGECOUNT, mapped.astype(np.uint64))
        root = HostRoot(self.root)
        c = IdleCollector(read_topology(root), root=root, sleep=self.interval,
                          **kwargs)  # type: ignore[arg-type]
        c.bitmap = EndingBitmap(root, self.end_word)
        return c


def _ages(scans: list, pfns: range | list[int]) -> np.ndarray:
    out = []
    for pfn in pfns:
        scan = next(s for s in scans if s.pfn_start <= pfn < s.pfn_start + s.idle_age.size)
        out.append(int(scan.idle_age[pfn - scan.pfn_start]))
    return np.array(out)


def test_mark_sets_exactly_the_ranges_bits_with_partial_edge_words(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(0, MAX_PFN, LRU_ANON)  # user pages everywhere, in the ranges and beside them
    c = k.collector()
    c.mark()
    expected = np.zeros(MAX_PFN, dtype=bool)
    expected[NODE0[0]:NODE0[1]] = True
    expected[NODE1[0]:NODE1[1]] = True
    assert np.array_equal(k.bits(), expected)
    assert c.health.state is State.OK


def test_accessed_idle_and_untracked_pages(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(200, 300, LRU_ANON)
    k.set_flags(300, 400, LRU_FILE)
    k.accessed = {*range(250, 300), *range(350, 360)}
    c = k.collector()
    scans = c.scan(1.0)
    assert [(s.pfn_start, s.idle_age.size) for s in scans] == [(100, 1000), (2048, 1024)]
    assert (_ages(scans, range(200, 250)) == 1).all()
    assert (_ages(scans, range(250, 300)) == 0).all()
    assert (_ages(scans, range(350, 360)) == 0).all()
    assert (_ages(scans, [100, 199, 400, 1099, 2048]) == UNTRACKED).all()
    assert c.stats[0] == NodeIdleStats(tracked=200, idle=140, anon=100, anon_idle=50)
    assert c.stats[0].file_idle == 90
    assert not scans[0].idle_age.flags.writeable


def test_ages_count_consecutive_idle_scans_and_saturate(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(2048, 2050, LRU_ANON)
    c = k.collector()
    for _ in range(3):
        scans = c.scan(1.0)
    assert _ages(scans, [2048, 2049]).tolist() == [3, 3]
    k.accessed = {2049}
    scans = c.scan(1.0)
    assert _ages(scans, [2048, 2049]).tolist() == [4, 0]
    k.accessed = set()
    for _ in range(IDLE_AGE_MAX + 5):
        scans = c.scan(1.0)
    assert _ages(scans, [2048]).tolist() == [IDLE_AGE_MAX]


def test_large_folio_tails_take_the_heads_state(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.thp(2048)  # 512 pages each, one per chunk
    k.thp(2560)
    k.accessed = {2560}  # only the head's bit ever changes in the kernel
    c = k.collector(chunk_pfns=512)
    scans = c.scan(1.0)
    assert (_ages(scans, range(2048, 2560)) == 1).all()
    assert (_ages(scans, range(2560, 3072)) == 0).all()
    assert c.stats[1] == NodeIdleStats(tracked=1024, idle=512, anon=1024, anon_idle=512,
                                       huge=1024)


def test_between_full_scans_only_blocks_with_user_pages_are_marked_and_read(
        tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(200, 300, LRU_ANON)
    k.set_flags(2600, 2603, LRU_FILE)
    c = k.collector(full_every=3)
    c.scan(1.0)  # full: finds the user pages
    k.set_flags(2600, 2603, 0)  # freed: 3 of 103, too few for an early full scan
    k.set_flags(900, 910, LRU_ANON)  # new, in an empty block
    k.collector()  # rewrites the fixture's kpageflags
    k.bitmap_path.write_bytes(bytes(MAX_PFN // 8))
    assert not c.full_scan
    c.mark()
    # The 2 MiB blocks that held user pages: 200-300's, and the freed pages' (still live).
    assert np.array_equal(np.flatnonzero(k.bits()), np.r_[100:512, 2560:3072])
    k.interval(1.0)
    scans = c.collect()
    assert (_ages(scans, range(200, 300)) == 2).all()
    assert (_ages(scans, [*range(2600, 2603), *range(900, 910)]) == UNTRACKED).all()
    assert c.stats[0].tracked == 100 and c.stats[1].tracked == 0
    k.bitmap_path.write_bytes(bytes(MAX_PFN // 8))
    c.mark()  # the freed pages' block is no longer scanned
    assert np.array_equal(np.flatnonzero(k.bits()), np.r_[100:512])
    k.interval(1.0)
    c.collect()
    assert c.full_scan  # the third scan after a full one is full again: the new page shows
    scans = c.scan(1.0)
    assert (_ages(scans, range(900, 910)) == 1).all() and c.stats[0].tracked == 110


def test_a_full_scan_marks_only_the_blocks_that_hold_user_pages(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(200, 300, LRU_ANON)
    k.set_flags(2600, 2603, LRU_FILE)
    c = k.collector()
    assert c.full_scan
    c.mark()  # kpageflags found the user pages first: nothing else is marked
    assert np.array_equal(np.flatnonzero(k.bits()), np.r_[100:512, 2560:3072])
    assert c.live_pfns == 412 + 512


def test_spans_apart_are_collected_together_in_one_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idle, "MERGE_GAP_BLOCKS", 1)  # node 0's blocks 0 and 2: two spans
    unpacked = []
    monkeypatch.setattr(idle, "unpack", lambda *a: unpacked.append(a) or unpack(*a))
    k = FakeKernel(tmp_path)
    k.set_flags(200, 300, LRU_ANON)
    k.thp(1024, 64)
    k.set_flags(1088, 1100, LRU_FILE)  # up to node 0's end, inside a word
    k.accessed = {250, 1024}
    c = k.collector()
    c.mark()
    assert [r.spans for r in c.ranges] == [[(100, 512), (1024, 1100)], []]
    k.interval(1.0)
    scans = c.collect()
    assert len(unpacked) == 1  # one numpy pass for both spans
    assert _ages(scans, [200, 250, 299, 1024, 1087, 1088, 1099]).tolist() == [1, 0, 1, 0, 0, 1, 1]
    assert (_ages(scans, [*range(100, 200), *range(512, 1024)]) == UNTRACKED).all()
    assert c.stats[0] == NodeIdleStats(tracked=176, idle=111, anon=164, anon_idle=99, huge=64)


def test_pages_leaving_the_live_blocks_bring_the_next_full_scan_forward(
        tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(200, 300, LRU_ANON)
    c = k.collector(full_every=100)
    c.scan(1.0)
    k.set_flags(200, 210, 0)  # migrated away: 10 of 100 pages vanish ...
    k.set_flags(2900, 2910, LRU_ANON)  # ... to an empty block
    k.collector()
    assert not c.full_scan
    scans = c.scan(1.0)
    assert (_ages(scans, range(2900, 2910)) == UNTRACKED).all()
    assert c.full_scan
    scans = c.scan(1.0)
    assert (_ages(scans, range(2900, 2910)) == 1).all() and not c.full_scan


def test_live_blocks_at_chunk_cuts_and_range_edges_stay_live(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(1000, 1100, LRU_ANON)  # node 0's last two blocks, [1024, 1100) past a chunk edge
    k.set_flags(2300, 2301, LRU_ANON)  # node 1: one page in its first block
    c = k.collector(full_every=100, chunk_pfns=512)
    for _ in range(3):
        scans = c.scan(1.0)
    assert (_ages(scans, [1000, 1099, 2300]) == 3).all()
    assert c.stats[0].tracked == 100 and c.stats[1].tracked == 1
    with pytest.raises(ValueError, match="full_every 0"):
        k.collector(full_every=0)
    with pytest.raises(ValueError, match="chunk_pfns 256 must be a positive multiple of 512"):
        k.collector(chunk_pfns=256)  # a chunk cut would split a block, and maybe a folio


def test_tails_before_the_scanned_range_are_untracked(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.thp(64, 128)  # head at 64 lies before node 0 (starts at 100)
    scans = k.collector().scan(1.0)
    assert (_ages(scans, range(100, 192)) == UNTRACKED).all()


def test_node_set_limits_the_scan(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(0, MAX_PFN, LRU_ANON)
    c = k.collector(nodes=[1])
    c.mark()
    assert not k.bits()[:2048].any() and k.bits()[2048:3072].all()
    assert [s.pfn_start for s in c.collect()] == [2048]
    with pytest.raises(TierdError, match=r"nodes \[7\] are not online"):
        k.collector(nodes=[7])


def test_pacing_sleeps_to_hold_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = Pacer(1000.0, lambda: now[0], sleep)
    for _ in range(4):
        pacer.advance(250)
    assert sum(slept) == pytest.approx(1.0)
    assert Pacer(None, lambda: 0.0, sleep).advance(10**9) is None and len(slept) == 4


def test_scan_is_paced_over_both_passes(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    k.set_flags(0, MAX_PFN, LRU_ANON)
    c = k.collector(pfns_per_second=2024.0, chunk_pfns=512, clock=lambda: now[0])
    c.sleep = sleep
    c.mark()  # a full scan: kpageflags of 2024 PFNs to find the user pages, then their mark
    assert now[0] == pytest.approx(2.0)  # 2 x 2024 PFNs at 2024 per second
    c.collect()
    assert now[0] == pytest.approx(3.0)
    c.mark()  # a steady scan marks only
    assert now[0] == pytest.approx(4.0)


def test_chunks_cut_at_aligned_boundaries() -> None:
    assert list(chunks(100, 700, 256)) == [(100, 256), (256, 512), (512, 700)]
    assert list(chunks(5, 5, 256)) == []


def test_missing_bitmap_makes_the_collector_unavailable(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.bitmap_path.unlink()
    c = k.collector()
    c.mark()
    assert c.collect() == []
    assert c.health.state is State.DISABLED
    assert "page_idle/bitmap: missing (kernel built without CONFIG_IDLE_PAGE_TRACKING)" in (
        c.health.reason)
    [cap] = idle_probe(HostRoot(k.root))
    assert not cap.usable and "CONFIG_IDLE_PAGE_TRACKING" in cap.reason


def test_probe_reports_usable_with_bitmap_kpageflags_and_kpagecount(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.collector()
    [cap] = idle_probe(HostRoot(k.root))
    assert cap.usable and "nodes [0, 1]" in cap.reason
    (k.root / kpf.KPAGECOUNT.lstrip("/")).unlink()
    [cap] = idle_probe(HostRoot(k.root))
    assert not cap.usable and "proc/kpagecount: missing" in cap.reason


def test_a_full_scan_finds_mapped_pages_and_leaves_unmapped_page_cache_alone(
        tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(200, 210, LRU_FILE & ~(1 << kpf.KPF_MMAP))  # page cache no process maps
    k.set_flags(2600, 2610, LRU_FILE & ~(1 << kpf.KPF_MMAP))
    k.set_flags(2700, 2710, LRU_ANON)  # mapped: the block is found, its page cache tracked
    c = k.collector()
    scans = c.scan(1.0)
    assert np.array_equal(np.flatnonzero(k.bits()), np.r_[2600:2610, 2700:2710])
    assert (_ages(scans, range(200, 210)) == UNTRACKED).all()
    assert (_ages(scans, [*range(2600, 2610), *range(2700, 2710)]) == 1).all()


def test_a_write_error_degrades_and_names_file_not_offset(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(200, 300, LRU_ANON)
    k.set_flags(2048, 2100, LRU_ANON)
    c = k.collector()
    k.bitmap_path.unlink()
    k.bitmap_path.symlink_to("/dev/full")  # every write fails with ENOSPC
    c.mark()
    scans = c.collect()
    assert c.health.state is State.DEGRADED
    assert "page_idle/bitmap: No space left on device; node 0" in c.health.reason
    assert "No space left on device; node 1" in c.health.reason  # node 1, too
    assert "0x" not in c.health.reason  # offsets say where memory lies: debug log only
    assert (_ages(scans, range(2048, 2100)) == UNTRACKED).all()  # never marked: unknown
    assert c.full_scan  # the next scan looks everywhere again


def test_a_bitmap_that_ends_mid_scan_degrades_and_leaves_the_rest_untracked(
        tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(2048, 3072, LRU_ANON)
    c = k.collector(chunk_pfns=512)
    c.mark()
    with open(k.bitmap_path, "r+b") as f:
        f.truncate(2560 // 8)  # the kernel's memory now ends at PFN 2560
    scans = c.collect()
    assert c.health.state is State.DEGRADED
    assert "bitmap: bitmap ends inside node 1" in c.health.reason and "0x" not in c.health.reason
    assert (_ages(scans, range(2048, 2560)) == 1).all()
    assert (_ages(scans, range(2560, 3072)) == UNTRACKED).all()
    assert not c.full_scan  # no page past the kernel's end: no reason to look everywhere
    c.mark()  # the next scan starts clean
    assert c.health.state is State.OK


def test_a_range_past_the_bitmap_by_under_a_block_is_trimmed_once_and_quietly(
        tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_block_size(2 * 2**20)  # 512 PFNs
    k.end_at(3040)  # node 1 ends at 3072: the bitmap, at 3008, 64 PFNs short
    k.set_flags(2900, 3072, LRU_ANON)
    k.accessed = set(range(2950, 3000))
    c = k.collector(chunk_pfns=512, full_every=1)
    for _ in range(2):
        scans = c.scan(1.0)
        assert c.health.state is State.OK, c.health.reason
    assert c.bitmap.cut_writes == 1  # the second scan stays inside the bitmap
    assert [(s.pfn_start, s.idle_age.size) for s in scans] == [(100, 1000), (2048, 960)]
    assert (_ages(scans, range(2900, 2950)) == 2).all()
    assert (_ages(scans, range(2950, 3000)) == 0).all()
    assert (_ages(scans, range(3000, 3008)) == 2).all()
    assert c.stats[1].tracked == 108 and c.tracked_pfns == 1960


def test_a_full_scan_finds_the_bitmaps_end_where_no_mark_went(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_block_size(2 * 2**20)
    k.end_at(3040)  # the bitmap ends at 3008, 64 PFNs before node 1
    k.set_flags(2100, 2200, LRU_ANON)  # no user page near the end: no mark goes there
    c = k.collector()
    scans = c.scan(1.0)
    assert c.health.state is State.OK, c.health.reason
    assert c.ranges[1].end == 3008 and scans[1].idle_age.size == 960
    assert (_ages(scans, range(2100, 2200)) == 1).all()


@pytest.mark.parametrize(("block_size", "max_pfn"), [
    (2 * 2**20, 2304),  # 768 PFNs short: more than a block
    (None, 3040),  # no block size: only a partial word is forgiven, not a whole one
])
def test_a_range_past_the_bitmap_by_more_degrades(
        tmp_path: Path, block_size: int | None, max_pfn: int) -> None:
    k = FakeKernel(tmp_path)
    if block_size:
        k.set_block_size(block_size)
    k.end_at(max_pfn)
    k.set_flags(2048, 2100, LRU_ANON)
    c = k.collector(chunk_pfns=512, full_every=1)
    scans = c.scan(1.0)
    end = max_pfn // PFNS_PER_WORD * PFNS_PER_WORD
    assert c.health.state is State.DEGRADED
    assert ("page_idle/bitmap: past the kernel's last PFN; "
            "node 1 partly untracked") in c.health.reason and "0x" not in c.health.reason
    assert (_ages(scans, range(2048, 2100)) == 1).all()
    assert (_ages(scans, range(end, 3072)) == UNTRACKED).all()
    c.scan(1.0)
    assert c.health.state is State.DEGRADED and c.ranges[1].end == NODE1[1]  # not trimmed


def test_a_kpageflags_read_error_degrades_that_range_only(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    k.set_flags(200, 300, LRU_ANON)
    k.set_flags(2048, 2100, LRU_ANON)
    c = k.collector()
    kpageflags_path = k.root / "proc" / "kpageflags"
    kpageflags_path.unlink()
    kpageflags_path.mkdir()  # reads fail with EISDIR
    c.flags_file.close()
    scans = c.scan(1.0)
    assert c.health.state is State.DEGRADED
    assert "kpageflags: Is a directory; node 0" in c.health.reason
    assert (_ages(scans, range(200, 300)) == UNTRACKED).all()
    assert c.full_scan  # the next scan looks everywhere again


# --- the lab: the real bitmap -------------------------------------------------------------

PAGE = mmap.PAGESIZE
HUGE = 2 * 2**20


class Buffer:
    """A mapping whose every page is present, with the PFNs behind it."""

    def __init__(self, size: int, shared: bool, advice: int) -> None:
        flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS
        self.map = mmap.mmap(-1, size + HUGE, flags=flags)  # slack to align to a huge page
        self.view = np.frombuffer(self.map, dtype=np.uint8)
        offset = -self.view.ctypes.data % HUGE
        self.view = self.view[offset:offset + size]
        self.map.madvise(advice, offset, size)
        self.touch()

    def touch(self) -> None:
        # A store, not a read-modify-write: a read fault on untouched anon
        # memory maps the (huge) zero page, and writing to that splits it.
        self.view[::PAGE] = 1

    def pfns(self) -> np.ndarray:
        entries = pagemap.read_pagemap(os.getpid(), self.view.ctypes.data, self.view.size // PAGE)
        pfns = pagemap.pfn_of(entries)
        assert (pfns != 0).all(), "every page is present"
        return pfns

    def close(self) -> None:
        del self.view
        self.map.close()


def _age_at(scans: list, pfns: np.ndarray) -> np.ndarray:
    ages = np.full(pfns.size, -1, dtype=np.int16)
    for s in scans:
        inside = (pfns >= s.pfn_start) & (pfns < s.pfn_start + s.idle_age.size)
        ages[inside] = s.idle_age[(pfns[inside] - s.pfn_start).astype(np.int64)]
    return ages


@pytest.mark.vm(kernels=["tierd"])
@pytest.mark.parametrize(("shared", "advice"), [
    (False, mmap.MADV_NOHUGEPAGE), (False, mmap.MADV_HUGEPAGE), (True, mmap.MADV_NOHUGEPAGE),
], ids=["anon", "anon-thp", "shmem"])
def test_lab_idle_collector_tells_touched_from_untouched(shared: bool, advice: int) -> None:
    hot, cold = Buffer(32 * 2**20, shared, advice), Buffer(32 * 2**20, shared, advice)
    try:
        topo = read_topology()
        hot_pfns, cold_pfns = hot.pfns(), cold.pfns()
        first = int(cold_pfns.min())
        cold_flags = kpf.read_flags(first, int(cold_pfns.max()) - first + 1)[cold_pfns - first]
        nodes = sorted(set(topo.node_of(np.concatenate([hot_pfns, cold_pfns])).tolist()))
        collector = IdleCollector(topo, nodes=nodes)
        collector.mark()
        drop_tlb()  # else the touch may go through TLB entries that predate the mark
        hot.touch()
        scans = collector.collect()
        assert collector.health.state is State.OK, collector.health.reason
        assert np.array_equal(hot.pfns(), hot_pfns) and np.array_equal(cold.pfns(), cold_pfns)
        hot_ages, cold_ages = _age_at(scans, hot_pfns), _age_at(scans, cold_pfns)
        assert np.mean(hot_ages == 0) >= 0.99, np.unique(hot_ages, return_counts=True)
        assert np.mean((cold_ages >= 1) & (cold_ages <= IDLE_AGE_MAX)) >= 0.99, (
            np.unique(cold_ages, return_counts=True))
        stats = collector.stats[nodes[0]]
        cold_idle = stats.file_idle if shared else stats.anon_idle
        assert cold_idle >= cold_pfns.size * 0.99, stats
        if advice == mmap.MADV_HUGEPAGE:  # 2 MiB folios: the tails follow their heads
            tails = kpf.has_any(cold_flags, kpf.KPF_COMPOUND_TAIL)
            assert tails.sum() >= cold_pfns.size * 0.9, "the kernel gave us THPs"
            assert stats.huge >= cold_pfns.size, stats
        collector.close()
    finally:
        hot.close()
        cold.close()


@pytest.mark.vm(kernels=["tierd"])
def test_lab_a_range_past_the_last_pfn_degrades_without_the_offset() -> None:
    topo = read_topology()
    last_end = int(topo._ends[-1])  # extend the last range 1 GiB past the kernel's memory
    beyond = replace(topo, _ends=np.append(topo._ends[:-1], last_end + 2**18).astype(np.uint64))
    collector = IdleCollector(beyond, nodes=[int(topo._owners[-1])])
    collector.mark()
    scans = collector.collect()
    assert collector.health.state is State.DEGRADED
    assert "page_idle/bitmap: past the kernel's last PFN" in collector.health.reason
    assert "offset" not in collector.health.reason  # where memory lies stays out of health
    assert "past the kernel's last PFN" in collector.health.reason
    tail = scans[-1].idle_age[-2**18:]
    assert (tail == UNTRACKED).all()


@pytest.mark.vm(kernels=["tierd"])
@pytest.mark.parametrize("overrun", [0, 32], ids=["as-read", "32-past"])
def test_lab_full_scans_of_every_node_are_ok(overrun: int) -> None:
    # A node span may end past the bitmap's reach (with `make bench`'s sizes
    # the kernel's last PFN ends 32 PFNs into a word): the first scan trims it.
    topo = read_topology()
    last_end = int(topo._ends[-1]) + overrun
    topo = replace(topo, _ends=np.append(topo._ends[:-1], last_end).astype(np.uint64))
    collector = IdleCollector(topo, full_every=1)
    for _ in range(2):
        collector.mark()
        scans = collector.collect()
        assert collector.health.state is State.OK, collector.health.reason
    kernel_end = last_end - overrun  # the trim loses at most the kernel's partial last word
    end = scans[-1].pfn_start + scans[-1].idle_age.size
    assert kernel_end - PFNS_PER_WORD < end <= kernel_end
    assert sum(s.tracked for s in collector.stats.values()) > 0
    collector.close()


@pytest.mark.vm(kernels=["stock"])
def test_lab_stock_kernel_has_no_idle_tracking_and_says_why() -> None:
    collector = IdleCollector(read_topology())
    collector.mark()
    assert collector.collect() == []
    assert collector.health.state is State.DISABLED
    assert "CONFIG_IDLE_PAGE_TRACKING" in collector.health.reason
    [cap] = idle_probe()
    assert not cap.usable and "page_idle/bitmap: missing" in cap.reason
