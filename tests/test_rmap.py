"""pagemap/maps readers and the reverse-map cache PFN -> (pid, vaddr)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from tierd.errors import KernelFileError
from tierd.kernel import pagemap
from tierd.kernel.numa import move_pages
from tierd.kernel.root import HostRoot

FIXTURES = Path(__file__).parent / "fixtures" / "movers"
ROOT = HostRoot(FIXTURES)
PID = 4242
PAGE = pagemap.PAGE_SIZE


def test_read_pagemap_decodes_present_swapped_and_file_pages() -> None:
    entries = pagemap.read_pagemap(PID, 16 * PAGE, 8, ROOT)
    pfns = pagemap.pfn_of(entries)
    assert pfns.tolist() == [0x1000, 0x1001, 0x1002, 0x1003, 0, 0, 0x2000, 0x3000]
    assert pagemap.is_exclusive(entries).tolist() == [True] * 4 + [False] * 4
    assert pagemap.is_file_or_shared(entries).tolist() == [False] * 6 + [True] * 2


def test_read_pagemap_past_the_end_reads_not_present() -> None:
    entries = pagemap.read_pagemap(PID, 22 * PAGE, 4, ROOT)
    assert pagemap.pfn_of(entries).tolist() == [0x2000, 0x3000, 0, 0]


def test_pfns_of_any_order_with_repeats_and_far_gaps() -> None:
    far = (pagemap.MERGE_GAP_PAGES + 100) * PAGE
    vaddrs = np.array([23 * PAGE + 5, 16 * PAGE, 16 * PAGE + 100, 21 * PAGE, far, 19 * PAGE],
                      dtype=np.uint64)
    assert pagemap.pfns_of(PID, vaddrs, ROOT).tolist() == [0x3000, 0x1000, 0x1000, 0, 0, 0x1003]


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
        assert pagemap.is_exclusive(entries).all()
    finally:
        del view
        buf.close()


def _node_start_pfn(node: int) -> int:
    """Lowest PFN of `node`'s memory blocks (node 1's range lies above node 0's in the lab)."""
    node_dir = Path(f"/sys/devices/system/node/node{node}")
    block_size = int(Path("/sys/devices/system/memory/block_size_bytes").read_text(), 16)
    blocks = [int(p.name.removeprefix("memory")) for p in node_dir.glob("memory[0-9]*")]
    return min(blocks) * block_size // PAGE
