"""The lab itself: the guest has the topology tierd is built for, on both kernels."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from lab import vm
from tierd.kernel.numa import move_pages

NODES = Path("/sys/devices/system/node")
TIERS = Path("/sys/devices/virtual/memory_tiering")
PAGE = mmap.PAGESIZE


def test_topology_args_make_node1_slower_and_cpuless() -> None:
    args = vm.topology_args("2G", "1G")
    assert args[args.index("-m") + 1] == "3072M"
    numa = [args[i + 1] for i, a in enumerate(args) if a == "-numa"]
    assert "node,nodeid=1,memdev=m1,initiator=0" in numa
    assert all("node-id=0" in n for n in numa if n.startswith("cpu,"))
    latency = {n.split("target=")[1][0]: n.rsplit("=", 1)[1]
               for n in numa if "access-latency" in n}
    assert int(latency["1"]) > int(latency["0"])


def _tier_of(node: int) -> int:
    for tier in TIERS.glob("memory_tier*"):
        nodelist = (tier / "nodelist").read_text().strip()
        if str(node) in nodelist.replace("-", ",").split(","):
            return int(tier.name.removeprefix("memory_tier"))
    raise AssertionError(f"node {node} is in no memory tier")


@pytest.mark.vm
def test_two_nodes_node1_cpuless_and_in_a_lower_tier() -> None:
    assert (NODES / "online").read_text().strip() == "0-1"
    assert (NODES / "node0/cpulist").read_text().strip() == "0-1"
    assert (NODES / "node1/cpulist").read_text().strip() == ""
    # A higher memory_tier id is a higher abstract distance: a slower tier.
    assert _tier_of(1) > _tier_of(0)


@pytest.mark.vm
def test_page_idle_only_on_the_tierd_kernel(lab_kernel: str) -> None:
    bitmap = Path("/sys/kernel/mm/page_idle/bitmap")
    if lab_kernel == "stock":
        assert not bitmap.exists()
    else:
        with open(bitmap, "rb") as f:
            f.seek(4096 * 8)
            assert len(f.read(4096)) == 4096


@pytest.mark.vm
def test_move_pages_moves_a_page_to_node1_and_back() -> None:
    npages = 16
    buf = mmap.mmap(-1, npages * PAGE)
    view = np.frombuffer(buf, dtype=np.uint8)
    view[:] = np.arange(view.size, dtype=np.uint64).astype(np.uint8)
    expected = view.copy()
    base = view.ctypes.data
    addrs = base + PAGE * np.arange(npages, dtype=np.uint64)
    try:
        assert (move_pages(0, addrs) == 0).all()
        assert (move_pages(0, addrs, np.ones(npages)) == 1).all()
        assert (move_pages(0, addrs) == 1).all()
        assert (move_pages(0, addrs, np.zeros(npages)) == 0).all()
        assert (move_pages(0, addrs) == 0).all()
        assert np.array_equal(view, expected)
    finally:
        del view
        buf.close()
