"""A fabricated large host under a directory, for tierd.kernel.root.HostRoot.

Writes what tierd reads on a 2-node CXL host of `gib` GiB (3/4 fast DRAM,
1/4 slow CXL): zoneinfo, node files, memory tiers, /proc/kpageflags,
/proc/kpagecount, /proc/kpagecgroup (sparse: no memcg), the idle bitmap, and
`processes` processes with maps, pagemap (sparse files: only mapped pages'
entries take disk), statm, comm, cgroup and exe.

Memory is laid out in 2 MiB blocks (512 PFNs). Of the fast node's blocks 5 %
are kernel memory and 3 % free; of the slow node's 5 % kernel and 25 % free.
The rest, shuffled across both nodes, belongs to processes:

- THP_SHARE of user blocks are one transparent huge page each (512 PFNs in
  virtual order, head and tail flags);
- the others are mapped in runs of RUN_PFNS consecutive PFNs, in a random
  order of runs inside the block (a buddy allocator's order-5 leftovers);
- SHARED_SHARE of user blocks are shmem segments mapped by SHARERS processes
  each (kpagecount SHARERS).

Process sizes follow a Zipf-like law (weight 1 / rank^0.9): a few large
services and many small ones. Every file is generated in chunks, so the
generator itself needs a few hundred MiB at any size.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tierd.kernel import kpageflags as kpf

BLOCK_PFNS = 512
RUN_PFNS = 32
THP_SHARE = 0.4
SHARED_SHARE = 0.03
SHARERS = 4
VMA_BLOCKS = 1024  # a private mapping of at most 2 GiB; larger sizes are several
FAST_KERNEL, FAST_FREE = 0.05, 0.03
SLOW_KERNEL, SLOW_FREE = 0.05, 0.25
HOT_SHARE = 0.08  # user blocks accessed every interval, in groups of HOT_GROUP blocks
HOT_GROUP = 8
PRIVATE_BASE = 0x7000_0000_0000  # each private mapping 4 GiB apart
SHARED_BASE = 0x6000_0000_0000
TEXT_BASE = 0x5555_5555_4000

FREE, KERNEL, PRIVATE, THP, SHARED = range(5)
USER_FLAGS = (1 << kpf.KPF_LRU) | (1 << kpf.KPF_MMAP) | (1 << kpf.KPF_UPTODATE)
FLAGS = {
    FREE: 1 << kpf.KPF_BUDDY,
    KERNEL: 1 << kpf.KPF_SLAB,
    PRIVATE: USER_FLAGS | (1 << kpf.KPF_ANON) | (1 << kpf.KPF_SWAPBACKED),
    THP: USER_FLAGS | (1 << kpf.KPF_ANON) | (1 << kpf.KPF_SWAPBACKED) | (1 << kpf.KPF_THP),
    SHARED: USER_FLAGS | (1 << kpf.KPF_SWAPBACKED),
}
PRESENT = np.uint64(1 << 63)


@dataclass(frozen=True)
class Shape:
    """What was fabricated: sizes and counts (written as shape.json)."""

    gib: int
    npfns: int
    fast_pfns: int
    processes: int
    user_pages: int  # PFNs mapped by some process
    mapped_entries: int  # (process, page) pairs: a shared page counts once per process
    thp_pages: int
    free_pages: tuple[int, int]  # per node


def _block_types(gib: int, rng: np.random.Generator) -> tuple[npt.NDArray[np.int8], int]:
    """Each block's type, and how many blocks the fast node has."""
    nblocks = (gib << 18) // BLOCK_PFNS
    fast = nblocks * 3 // 4
    types = np.empty(nblocks, dtype=np.int8)
    for start, end, kernel, free in ((0, fast, FAST_KERNEL, FAST_FREE),
                                     (fast, nblocks, SLOW_KERNEL, SLOW_FREE)):
        n = end - start
        draw = rng.random(n)
        part = np.full(n, PRIVATE, dtype=np.int8)
        part[draw < kernel + free] = FREE
        part[draw < kernel] = KERNEL
        types[start:end] = part
    user = np.flatnonzero(types == PRIVATE)
    kind = rng.random(user.size)
    types[user[kind < THP_SHARE]] = THP
    types[user[kind > 1 - SHARED_SHARE]] = SHARED
    return types, fast


def _write_pfn_files(root: Path, types: npt.NDArray[np.int8]) -> None:
    """kpageflags and kpagecount, a few thousand blocks at a time; kpagecgroup sparse."""
    proc = root / "proc"
    flags_table = np.array([FLAGS[t] for t in range(5)], dtype=np.uint64)
    count_table = np.array([0, 0, 1, 1, SHARERS], dtype=np.uint64)
    head = np.zeros(BLOCK_PFNS, dtype=np.uint64)
    head[0] = 1 << kpf.KPF_COMPOUND_HEAD
    head[1:] = 1 << kpf.KPF_COMPOUND_TAIL
    step = 4096
    with open(proc / "kpageflags", "wb") as flags_out, open(proc / "kpagecount", "wb") as count:
        for start in range(0, types.size, step):
            part = types[start:start + step]
            flags = np.repeat(flags_table[part][:, None], BLOCK_PFNS, axis=1)
            flags[part == THP] |= head
            flags_out.write(flags.tobytes())
            count.write(np.repeat(count_table[part], BLOCK_PFNS).tobytes())
    with open(proc / "kpagecgroup", "wb") as cgroup:
        cgroup.truncate(types.size * BLOCK_PFNS * 8)


def _block_pfns(blocks: npt.NDArray[np.int64], types: npt.NDArray[np.int8],
                rng: np.random.Generator) -> npt.NDArray[np.uint64]:
    """The PFNs of `blocks` in the virtual order of their mapping."""
    runs = BLOCK_PFNS // RUN_PFNS
    order = np.argsort(rng.random((blocks.size, runs)), axis=1)
    order[types[blocks] == THP] = np.arange(runs)  # a huge page maps in order
    pfns = (blocks[:, None, None] * BLOCK_PFNS + order[:, :, None] * RUN_PFNS
            + np.arange(RUN_PFNS)[None, None, :])
    return pfns.reshape(-1).astype(np.uint64)


def _map_line(start: int, npages: int, perms: str, name: str) -> str:
    return f"{start:012x}-{start + npages * 4096:012x} {perms} 00000000 00:00 0 {name}\n"


class _Process:
    """One process's files, written as its mappings are added."""

    def __init__(self, root: Path, pid: int) -> None:
        self.dir = root / "proc" / str(pid)
        self.dir.mkdir(parents=True)
        self.maps: list[tuple[int, str]] = []
        self.resident = 0
        self.pagemap = open(self.dir / "pagemap", "wb")  # noqa: SIM115 (closed by finish)

    def map(self, vaddr: int, pfns: npt.NDArray[np.uint64], name: str = "") -> None:
        self.pagemap.seek((vaddr >> 12) * 8)
        self.pagemap.write((pfns | PRESENT).tobytes())
        self.maps.append((vaddr, _map_line(vaddr, pfns.size, "rw-p", name)))
        self.resident += pfns.size

    def finish(self, pid: int) -> None:
        # Mappings with nothing present: tierd reads their pagemap too.
        for vaddr, npages, perms, name in ((TEXT_BASE, 256, "r-xp", "/usr/bin/service"),
                                           (0x7ffc_0000_0000, 33, "rw-p", "[stack]"),
                                           (0x7ffc_1000_0000, 4, "r--p", "[vvar]"),
                                           (0x7ffc_1000_4000, 2, "r-xp", "[vdso]")):
            self.maps.append((vaddr, _map_line(vaddr, npages, perms, name)))
        self.pagemap.truncate(0x8000_0000_0000 >> 12 << 3)
        self.pagemap.close()
        (self.dir / "maps").write_text("".join(line for _, line in sorted(self.maps)))
        (self.dir / "statm").write_text(f"{self.resident + 300} {self.resident} 0 256 0 0 0\n")
        (self.dir / "comm").write_text(f"service{pid}\n")
        (self.dir / "cgroup").write_text(f"0::/system.slice/service{pid}.service\n")
        os.symlink("/usr/bin/service", self.dir / "exe")


def _write_processes(root: Path, types: npt.NDArray[np.int8], processes: int,
                     rng: np.random.Generator) -> int:
    """Every process's files; returns the (process, page) pairs mapped."""
    private = rng.permutation(np.flatnonzero((types == PRIVATE) | (types == THP)))
    shared = rng.permutation(np.flatnonzero(types == SHARED))
    weight = 1.0 / np.arange(1, processes + 1) ** 0.9
    cuts = np.rint(np.cumsum(weight / weight.sum()) * private.size).astype(np.int64)
    groups = -(-processes // SHARERS)
    shared_cuts = np.linspace(0, shared.size, groups + 1).astype(np.int64)
    shared_pfns = [_block_pfns(shared[a:b], types, rng)
                   for a, b in pairwise(shared_cuts.tolist())]
    entries = 0
    start = 0
    for rank, end in enumerate(cuts.tolist()):
        pid = 4_100_000 + rank  # above any real pid: tierd skips its own
        proc = _Process(root, pid)
        mine = private[start:end]
        start = end
        for k, first in enumerate(range(0, mine.size, VMA_BLOCKS)):
            pfns = _block_pfns(mine[first:first + VMA_BLOCKS], types, rng)
            proc.map(PRIVATE_BASE + (k << 32), pfns)
        if shared_pfns[rank // SHARERS].size:
            proc.map(SHARED_BASE, shared_pfns[rank // SHARERS], "/dev/shm/segment")
        entries += proc.resident
        proc.finish(pid)
    return entries


def _write_node_files(root: Path, npfns: int, fast: int, free: tuple[int, int]) -> None:
    """zoneinfo, the node directories and the kernel's memory tiers."""
    zoneinfo = []
    for node, (start, end) in enumerate(((0, fast), (fast, npfns))):
        pages = end - start
        low = pages // 1000  # about what a large zone's watermarks come to
        zoneinfo.append(
            f"Node {node}, zone   Normal\n  pages free     {free[node]}\n"
            f"        boost    0\n        min      {low}\n        low      {low * 5 // 4}\n"
            f"        high     {low * 3 // 2}\n        promo    {low * 7 // 4}\n"
            f"        spanned  {pages}\n        present  {pages}\n        managed  {pages}\n"
            f"        cma      0\n      nr_free_pages {free[node]}\n"
            f"  start_pfn:           {start}\n")
        node_dir = root / "sys/devices/system/node" / f"node{node}"
        node_dir.mkdir(parents=True)
        (node_dir / "meminfo").write_text(
            f"Node {node} MemTotal: {pages * 4} kB\nNode {node} MemFree: {free[node] * 4} kB\n")
        (node_dir / "vmstat").write_text(f"nr_free_pages {free[node]}\n")
        (node_dir / "distance").write_text("10 20\n" if node == 0 else "20 10\n")
        (node_dir / "cpulist").write_text("0-1\n" if node == 0 else "\n")
        tier = root / "sys/devices/virtual/memory_tiering" / f"memory_tier{4 + node}"
        tier.mkdir(parents=True)
        (tier / "nodelist").write_text(f"{node}\n")
    (root / "sys/devices/system/node/online").write_text("0-1\n")
    (root / "proc/zoneinfo").write_text("".join(zoneinfo))


def fabricate(root: Path, gib: int, processes: int = 300, seed: int = 22) -> Shape:
    """Write a host of `gib` GiB under `root` (replacing what is there)."""
    if root.exists():
        shutil.rmtree(root)
    (root / "proc").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    types, fast_blocks = _block_types(gib, rng)
    npfns = types.size * BLOCK_PFNS
    free = (int(np.count_nonzero(types[:fast_blocks] == FREE)) * BLOCK_PFNS,
            int(np.count_nonzero(types[fast_blocks:] == FREE)) * BLOCK_PFNS)
    _write_node_files(root, npfns, fast_blocks * BLOCK_PFNS, free)
    _write_pfn_files(root, types)
    bitmap = root / "sys/kernel/mm/page_idle/bitmap"
    bitmap.parent.mkdir(parents=True)
    with open(bitmap, "wb") as f:
        f.truncate(npfns // 8)
    entries = _write_processes(root, types, processes, rng)
    hot = _hot_blocks(types, rng)
    np.save(root / "hot_blocks.npy", hot)
    user = np.count_nonzero(types >= PRIVATE)
    shape = Shape(gib, npfns, fast_blocks * BLOCK_PFNS, processes, int(user) * BLOCK_PFNS,
                  entries, int(np.count_nonzero(types == THP)) * BLOCK_PFNS, free)
    (root / "shape.json").write_text(json.dumps(asdict(shape)))
    return shape


def _hot_blocks(types: npt.NDArray[np.int8], rng: np.random.Generator
                ) -> npt.NDArray[np.int64]:
    """The first block of each group of HOT_GROUP user blocks accessed every interval."""
    groups = types.size // HOT_GROUP
    user = (types >= PRIVATE).reshape(groups, HOT_GROUP).all(axis=1)
    candidates = np.flatnonzero(user)
    count = int(HOT_SHARE * np.count_nonzero(types >= PRIVATE) / HOT_GROUP)
    chosen = rng.choice(candidates, size=min(count, candidates.size), replace=False)
    return np.sort(chosen) * HOT_GROUP


def read_shape(root: Path) -> Shape:
    data = json.loads((root / "shape.json").read_text())
    data["free_pages"] = tuple(data["free_pages"])
    return Shape(**data)
