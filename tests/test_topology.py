"""Topology and capacity: zoneinfo, nodes, memory tiers, PFN ranges, `tierd topology`."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tierd.cli import main
from tierd.collectors.topology import (
    intersect_ranges,
    merge_ranges,
    probe,
    read_topology,
    refresh_topology,
)
from tierd.errors import KernelFileError
from tierd.kernel import memtiers, pagemap
from tierd.kernel.nodes import parse_cpulist, parse_meminfo
from tierd.kernel.numa import move_pages
from tierd.kernel.root import HostRoot
from tierd.kernel.zoneinfo import parse_zoneinfo, read_zoneinfo

FIXTURES = Path(__file__).parent / "fixtures" / "topology"
LAB = FIXTURES / "lab-6.12"  # captured from the lab guest (stock 6.12, 2 + 2 GiB)
HOST61 = FIXTURES / "host-6.1"  # two sockets and a CXL expander (dax/kmem) on 6.1
NODE_DIR = "sys/devices/system/node"
PAGE = mmap.PAGESIZE


def _copy(tmp_path: Path, fixture: Path) -> Path:
    root = tmp_path / fixture.name
    shutil.copytree(fixture, root, symlinks=True)
    return root


# --- /proc/zoneinfo ---------------------------------------------------------------


def test_zoneinfo_612_has_every_zone_with_watermarks_and_spans() -> None:
    info = read_zoneinfo(HostRoot(LAB))
    assert [(z.node, z.name) for z in info.zones][:3] == [(0, "DMA"), (0, "DMA32"), (0, "Normal")]
    assert len(info.zones) == 10
    dma = info.zones[0]
    assert (dma.start_pfn, dma.spanned, dma.present, dma.managed) == (1, 4095, 3998, 3840)
    assert (dma.free, dma.min, dma.low, dma.high, dma.promo) == (3712, 86, 107, 128, 149)
    assert dma.stats["nr_free_pages"] == 3712 and dma.stats["numa_hit"] == 1
    normal1 = info.of_node(1)[2]
    assert (normal1.name, normal1.start_pfn, normal1.end_pfn) == ("Normal", 1048576, 1310720)
    assert info.node_stats[0]["pgpromote_success"] == 0
    assert "nr_active_anon" in info.node_stats[1]


def test_unpopulated_zones_have_no_start_pfn() -> None:
    info = read_zoneinfo(HostRoot(LAB))
    movable = info.of_node(0)[3]
    assert movable.name == "Movable" and not movable.populated
    assert movable.start_pfn is None and movable.end_pfn is None


def test_zoneinfo_61_has_no_promo_watermark() -> None:
    info = read_zoneinfo(HostRoot(HOST61))
    assert all(z.promo is None for z in info.zones)
    assert info.of_node(2)[3].name == "Movable" and info.of_node(2)[3].managed == 16777216


def test_zoneinfo_bad_number_names_the_line() -> None:
    text = "Node 0, zone   Normal\n  pages free     12x\n"
    with pytest.raises(KernelFileError, match=r"zoneinfo: line 2: cannot parse 'pages free"):
        parse_zoneinfo(text)


def test_zoneinfo_truncated_zone_names_the_zone() -> None:
    text = "Node 0, zone   Normal\n  pages free     12\n        boost    0\n"
    with pytest.raises(KernelFileError, match=r"Node 0, zone Normal: zone lacks min, low"):
        parse_zoneinfo(text)


def test_empty_zoneinfo_is_an_error() -> None:
    with pytest.raises(KernelFileError, match="no zones"):
        parse_zoneinfo("")


# --- nodes -----------------------------------------------------------------------------


def test_cpulist_forms() -> None:
    assert parse_cpulist("0-2,8,10-11\n") == [0, 1, 2, 8, 10, 11]
    assert parse_cpulist("\n") == []
    with pytest.raises(KernelFileError, match="bad list item 'x'"):
        parse_cpulist("0,x")


def test_meminfo_in_bytes_and_hugepage_counts_unitless() -> None:
    info = parse_meminfo("Node 1 MemTotal:  2048 kB\nNode 1 HugePages_Total:     3\n")
    assert info == {"MemTotal": 2048 * 1024, "HugePages_Total": 3}
    with pytest.raises(KernelFileError, match="line 1: cannot parse"):
        parse_meminfo("garbage\n")


# --- the snapshot -------------------------------------------------------------------


def test_lab_topology_two_nodes_node1_cpuless_and_slower() -> None:
    topo = read_topology(HostRoot(LAB))
    assert list(topo.nodes) == [0, 1]
    assert topo.nodes[0].cpus == (0, 1) and topo.nodes[1].cpus == ()
    assert [(t.rank, t.id, t.nodes, t.source) for t in topo.tiers] == [
        (0, 4, (0,), "memory_tiering"), (1, 54, (1,), "memory_tiering")]
    assert topo.tier_of(1).id == 54
    node1 = topo.nodes[1]
    assert node1.managed_pages == 245728 + 253195
    assert node1.watermark_promo is not None and node1.watermark_promo > node1.watermark_high
    assert node1.meminfo["MemTotal"] == 1995692 * 1024
    assert "pgdemote_kswapd" in node1.vmstat and "pgpromote_success" in node1.vmstat
    assert topo.problems == ()


def test_pfn_ranges_come_from_memory_blocks_trimmed_by_zones() -> None:
    topo = read_topology(HostRoot(LAB))
    # Block 0 starts at PFN 0 but zone DMA at 1; node 1 has the 3-4 GiB PCI hole.
    assert topo.nodes[0].pfn_ranges == ((1, 524288),)
    assert topo.nodes[1].pfn_ranges == ((524288, 786432), (1048576, 1310720))
    assert topo.pfn_ranges([1]) == [(524288, 786432, 1), (1048576, 1310720, 1)]


def test_node_of_maps_pfns_and_holes() -> None:
    topo = read_topology(HostRoot(LAB))
    pfns = np.array([0, 1, 524287, 524288, 786431, 786432, 1048575, 1048576, 1310719, 1310720,
                     2**40], dtype=np.uint64)
    assert topo.node_of(pfns).tolist() == [-1, 0, 0, 1, 1, -1, -1, 1, 1, -1, -1]
    assert topo.node_of(np.empty(0, np.uint64)).shape == (0,)


def test_without_memory_blocks_ranges_are_zone_spans() -> None:
    topo = read_topology(HostRoot(HOST61))
    assert topo.nodes[0].pfn_ranges == ((1, 33554432),)
    assert topo.nodes[2].pfn_ranges == ((68157440, 84934656),)
    assert topo.node_of([33554431, 33554432, 34078720, 84934655]).tolist() == [0, -1, 1, 2]


def test_offline_memory_blocks_are_left_out(tmp_path: Path) -> None:
    root = _copy(tmp_path, LAB)
    (root / "sys/devices/system/memory/memory39/state").write_text("offline\n")
    topo = read_topology(HostRoot(root))
    assert topo.nodes[1].pfn_ranges == ((524288, 786432), (1048576, 1277952))


def _set_zone_field(root: Path, node: int, zone: str, key: str, value: int) -> None:
    """Rewrite one `key value` line of one zone in root's /proc/zoneinfo."""
    path = root / "proc/zoneinfo"
    lines, current = path.read_text().splitlines(), None
    for i, line in enumerate(lines):
        if line.startswith("Node "):
            current = line.split(",")[0] == f"Node {node}" and line.split()[-1] == zone
        elif current and line.split()[:-1] == key.split():
            lines[i] = f"{line[:len(line) - len(line.lstrip())]}{key} {value}"
            current = None
    path.write_text("\n".join(lines) + "\n")


def test_refresh_reads_free_pages_again_and_keeps_the_layout(tmp_path: Path) -> None:
    root = _copy(tmp_path, LAB)
    first = read_topology(HostRoot(root))
    # Memory blocks are not read again: a refresh that did would see this one offline.
    (root / "sys/devices/system/memory/memory39/state").write_text("offline\n")
    _set_zone_field(root, 1, "Normal", "pages free", 1234)
    now = refresh_topology(first, HostRoot(root))
    assert now.nodes[1].pfn_ranges == first.nodes[1].pfn_ranges
    assert now.nodes[1].zones[2].free == 1234 and first.nodes[1].zones[2].free != 1234
    assert now.node_of([1277952]).tolist() == [1]
    assert now.nodes[1].meminfo == {} and first.nodes[1].meminfo


def test_refresh_after_hotplug_reads_the_memory_blocks_again(tmp_path: Path) -> None:
    root = _copy(tmp_path, LAB)
    first = read_topology(HostRoot(root))
    (root / "sys/devices/system/memory/memory39/state").write_text("offline\n")
    present = first.nodes[1].zones[2].present
    _set_zone_field(root, 1, "Normal", "present", present - 32768)
    now = refresh_topology(first, HostRoot(root))
    assert now.nodes[1].pfn_ranges == ((524288, 786432), (1048576, 1277952))
    assert now.node_of([1277952]).tolist() == [-1]


def test_61_host_tiers_put_cxl_node_below_both_sockets() -> None:
    topo = read_topology(HostRoot(HOST61))
    assert [(t.id, t.nodes) for t in topo.tiers] == [(4, (0, 1)), (22, (2,))]
    assert topo.nodes[1].tier_rank == 0 and topo.nodes[2].tier_rank == 1
    assert topo.nodes[2].watermark_promo is None


def test_without_memory_tiering_hmat_gives_the_kernels_tier_ids(tmp_path: Path) -> None:
    root = _copy(tmp_path, LAB)
    shutil.rmtree(root / "sys/devices/virtual/memory_tiering")
    topo = read_topology(HostRoot(root))
    assert [(t.id, t.nodes, t.source) for t in topo.tiers] == [
        (4, (0,), memtiers.SOURCE_HMAT), (54, (1,), memtiers.SOURCE_HMAT)]


def test_without_tiering_or_hmat_the_distance_decides(tmp_path: Path) -> None:
    root = _copy(tmp_path, HOST61)
    shutil.rmtree(root / "sys/devices/virtual/memory_tiering")
    topo = read_topology(HostRoot(root))
    # Each socket is local (10) to itself; the expander is 24 from socket 0.
    assert [(t.id, t.nodes, t.source) for t in topo.tiers] == [
        (10, (0, 1), memtiers.SOURCE_DISTANCE), (24, (2,), memtiers.SOURCE_DISTANCE)]


def test_unreadable_meminfo_degrades_only_that_node(tmp_path: Path) -> None:
    root = _copy(tmp_path, LAB)
    (root / NODE_DIR / "node1/meminfo").unlink()
    topo = read_topology(HostRoot(root))
    assert topo.nodes[1].meminfo == {} and topo.nodes[0].meminfo
    assert len(topo.problems) == 1 and "node1/meminfo: missing" in topo.problems[0]
    [cap] = probe(HostRoot(root))
    assert cap.usable and "degraded" in cap.reason and "node1/meminfo" in cap.reason


def test_missing_zoneinfo_makes_topology_unusable(tmp_path: Path) -> None:
    root = _copy(tmp_path, LAB)
    (root / "proc/zoneinfo").unlink()
    with pytest.raises(KernelFileError, match="proc/zoneinfo: missing"):
        read_topology(HostRoot(root))
    [cap] = probe(HostRoot(root))
    assert not cap.usable and "proc/zoneinfo: missing" in cap.reason


def test_range_helpers() -> None:
    assert merge_ranges([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]
    assert intersect_ranges([(0, 10), (20, 30)], [(5, 25)]) == [(5, 10), (20, 25)]


# --- `tierd topology` --------------------------------------------------------------------


def test_topology_command_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "--root", str(LAB)]) == 0
    out = capsys.readouterr().out
    assert "memory_tier54" in out or "54" in out
    lines = out.splitlines()
    node1 = next(line for line in lines if line.split()[:1] == ["1"])
    assert "-" in node1.split()  # no CPUs


def test_topology_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "--json", "--root", str(LAB)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [n["id"] for n in data["nodes"]] == [0, 1]
    assert data["nodes"][1]["pfn_ranges"] == [[524288, 786432], [1048576, 1310720]]
    assert data["tiers"][1]["nodes"] == [1]


def test_topology_command_fails_cleanly_without_zoneinfo(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "--root", str(tmp_path)]) == 1
    assert "zoneinfo: missing" in capsys.readouterr().err


# --- the lab: the topology the guest was booted with ------------------------------------

GIB = 2**30


@pytest.mark.vm
def test_lab_topology_is_what_the_guest_was_booted_with() -> None:
    topo = read_topology()
    assert list(topo.nodes) == [0, 1]
    assert topo.nodes[0].cpus == (0, 1) and topo.nodes[1].cpus == ()
    assert topo.nodes[1].tier_rank > topo.nodes[0].tier_rank
    assert topo.tiers[0].source == memtiers.SOURCE_KERNEL
    for node in topo.nodes.values():
        assert 1.8 * GIB < node.meminfo["MemTotal"] <= 2 * GIB
        spanned = sum(e - s for s, e in node.pfn_ranges)
        assert 1.8 * GIB < spanned * PAGE <= 2 * GIB
        assert node.managed_pages <= spanned
        assert node.watermark_min < node.watermark_low < node.watermark_high
        assert "pgpromote_success" in node.vmstat
    assert topo.problems == ()


@pytest.mark.vm
def test_lab_node_of_finds_pages_moved_between_nodes() -> None:
    npages = 64
    buf = mmap.mmap(-1, npages * PAGE)
    view = np.frombuffer(buf, dtype=np.uint8)
    try:
        view[::PAGE] = 1
        base = view.ctypes.data
        addrs = base + PAGE * np.arange(npages, dtype=np.uint64)
        topo = read_topology()
        for node in (1, 0):
            assert (move_pages(0, addrs, np.full(npages, node)) == node).all()
            pfns = pagemap.pfn_of(pagemap.read_pagemap(os.getpid(), base, npages))
            assert (pfns != 0).all()
            assert (topo.node_of(pfns) == node).all()
    finally:
        del view
        buf.close()


def _tierd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tierd", *args],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.vm
def test_lab_topology_and_probe_commands(lab_kernel: str) -> None:
    table = _tierd("topology")
    assert table.returncode == 0, table.stderr
    assert "tiers, fast to slow: tier 4 (rank 0, from memory_tiering): nodes 0; tier 54 " \
        "(rank 1, from memory_tiering): nodes 1" in table.stdout
    data = json.loads(_tierd("topology", "--json").stdout)
    assert [n["id"] for n in data["nodes"]] == [0, 1]
    probe_text = _tierd("probe")
    assert probe_text.returncode == 0, probe_text.stderr
    caps = {c["name"]: c for c in json.loads(_tierd("probe", "--json").stdout)}
    assert caps["topology"]["usable"]
    assert caps["idle_page_tracking"]["usable"] == (lab_kernel == "tierd")
    if lab_kernel == "stock":
        assert "CONFIG_IDLE_PAGE_TRACKING" in caps["idle_page_tracking"]["reason"]
