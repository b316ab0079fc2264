"""Topology and capacity: nodes, tiers, zones, watermarks and each node's PFN ranges.

`read_topology()` takes one snapshot of the host, `refresh_topology()` the
next one cheaply (the layout stays until hotplug changes it); `Topology.node_of(pfns)`
maps any PFN array to node ids without a syscall (a binary search over the
sorted PFN ranges). PFN ranges come from the node's online memory blocks
intersected with its zone spans in /proc/zoneinfo (blocks leave out holes,
zones trim the blocks' edges); without memory blocks, from the zones alone.

Only zoneinfo and the node list are essential: a node whose meminfo, vmstat
or memory blocks cannot be read keeps empty figures and the problem is listed
in `Topology.problems`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError
from tierd.kernel import memtiers
from tierd.kernel import nodes as sysnodes
from tierd.kernel.root import HOST, HostRoot
from tierd.kernel.zoneinfo import Zone, read_zoneinfo
from tierd.vocabulary import PAGE_SIZE, Capability, NodeFacts

Range = tuple[int, int]  # [start_pfn, end_pfn)


@dataclass(frozen=True)
class Tier:
    """One memory tier; `rank` 0 is the fastest."""

    rank: int
    id: int  # the kernel's memory_tierN (or the derived equivalent)
    nodes: tuple[int, ...]
    source: str  # memtiers.SOURCE_*


@dataclass(frozen=True)
class Node:
    id: int
    cpus: tuple[int, ...]
    tier_rank: int | None  # None: in no tier (a node without memory)
    zones: tuple[Zone, ...]
    pfn_ranges: tuple[Range, ...]
    meminfo: dict[str, int] = field(default_factory=dict)  # bytes (HugePages_*: counts)
    vmstat: dict[str, int] = field(default_factory=dict)  # incl. pgpromote_*, pgdemote_*

    def _sum(self, attr: str) -> int:
        return sum(getattr(z, attr) for z in self.zones)

    @property
    def managed_pages(self) -> int:
        return self._sum("managed")

    @property
    def free_pages(self) -> int:
        return self._sum("free")

    @property
    def watermark_min(self) -> int:
        return self._sum("min")

    @property
    def watermark_low(self) -> int:
        return self._sum("low")

    @property
    def watermark_high(self) -> int:
        return self._sum("high")

    @property
    def watermark_promo(self) -> int | None:
        """Sum of the zones' promo watermarks; None on kernels without them."""
        promos = [z.promo for z in self.zones]
        return None if any(p is None for p in promos) else sum(p or 0 for p in promos)

    @property
    def has_memory(self) -> bool:
        return self.managed_pages > 0


@dataclass(frozen=True)
class Topology:
    nodes: dict[int, Node]
    tiers: tuple[Tier, ...]  # fast to slow
    problems: tuple[str, ...] = ()
    # Sorted, non-overlapping PFN ranges of all nodes, for node_of().
    _starts: npt.NDArray[np.uint64] = field(default_factory=lambda: np.empty(0, np.uint64))
    _ends: npt.NDArray[np.uint64] = field(default_factory=lambda: np.empty(0, np.uint64))
    _owners: npt.NDArray[np.int32] = field(default_factory=lambda: np.empty(0, np.int32))

    def node_of(self, pfns: npt.ArrayLike) -> npt.NDArray[np.int32]:
        """The node of each PFN; -1 for PFNs in no node's range (holes, beyond memory)."""
        pfn_array = np.asarray(pfns, dtype=np.uint64)
        if self._starts.size == 0:
            return np.full(pfn_array.shape, -1, dtype=np.int32)
        index = np.searchsorted(self._starts, pfn_array, side="right").astype(np.int64) - 1
        clipped = np.maximum(index, 0)
        inside = (index >= 0) & (pfn_array < self._ends[clipped])
        return np.where(inside, self._owners[clipped], np.int32(-1)).astype(np.int32)

    def tier_of(self, node: int) -> Tier | None:
        rank = self.nodes[node].tier_rank
        return None if rank is None else self.tiers[rank]

    def memory_nodes(self) -> list[int]:
        return [n.id for n in self.nodes.values() if n.has_memory]

    def pfn_ranges(self, nodes: list[int] | None = None) -> list[tuple[int, int, int]]:
        """(start, end, node) of every range of `nodes` (default: all), by start PFN."""
        wanted = set(self.nodes if nodes is None else nodes)
        return [(int(s), int(e), int(o))
                for s, e, o in zip(self._starts, self._ends, self._owners, strict=True)
                if o in wanted]

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view (page counts, PFN ranges as [start, end))."""
        def node_dict(node: Node) -> dict[str, object]:
            d = asdict(node)
            d["zones"] = [asdict(z) for z in node.zones]
            d.update(managed_pages=node.managed_pages, free_pages=node.free_pages,
                     watermark_min=node.watermark_min, watermark_low=node.watermark_low,
                     watermark_high=node.watermark_high, watermark_promo=node.watermark_promo)
            return d

        return {
            "page_size": PAGE_SIZE,
            "tiers": [asdict(t) for t in self.tiers],
            "nodes": [node_dict(n) for n in self.nodes.values()],
            "problems": list(self.problems),
        }


def merge_ranges(ranges: list[Range]) -> list[Range]:
    """Sort and coalesce touching or overlapping ranges."""
    merged: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect_ranges(a: list[Range], b: list[Range]) -> list[Range]:
    """Intersection of two merged range lists (two-pointer sweep)."""
    out: list[Range] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _zone_ranges(zones: tuple[Zone, ...]) -> list[Range]:
    return merge_ranges([(z.start_pfn, z.start_pfn + z.spanned)
                         for z in zones if z.start_pfn is not None and z.populated])


def _block_ranges(blocks: list[sysnodes.MemoryBlock], block_size: int) -> list[Range]:
    pages = block_size // PAGE_SIZE
    return merge_ranges([(b.index * pages, (b.index + 1) * pages) for b in blocks if b.online])


def _node_ranges(node: int, zones: tuple[Zone, ...], block_size: int | None,
                 root: HostRoot, problems: list[str]) -> list[Range]:
    zone_ranges = _zone_ranges(zones)
    if block_size is None:
        return zone_ranges
    try:
        blocks = sysnodes.node_memory_blocks(node, root)
    except KernelFileError as e:
        problems.append(f"node {node} memory blocks: {e}; using zone spans")
        return zone_ranges
    if not blocks:
        return zone_ranges
    return intersect_ranges(_block_ranges(blocks, block_size), zone_ranges)


def _optional(read: Callable[[], dict[str, int]], problems: list[str]) -> dict[str, int]:
    try:
        return read()
    except KernelFileError as e:
        problems.append(str(e))
        return {}


def _tiers(node_ids: list[int], memory_nodes: list[int], cpu_nodes: list[int],
           root: HostRoot, problems: list[str]) -> tuple[list[Tier], dict[int, int]]:
    try:
        raw = memtiers.read_tiers(memory_nodes, cpu_nodes, root)
    except KernelFileError as e:
        problems.append(f"memory tiers: {e}; all memory nodes in one tier")
        raw = [memtiers.MemoryTier(0, tuple(memory_nodes), memtiers.SOURCE_NONE)]
    tiers = [Tier(rank, t.id, t.nodes, t.source) for rank, t in enumerate(raw)]
    rank_of = {n: t.rank for t in tiers for n in t.nodes if n in node_ids}
    return tiers, rank_of


def node_facts(topology: Topology) -> list[NodeFacts]:
    """The facts of every node with memory and a tier, as the policy and the trace take them."""
    return [NodeFacts(node=node.id, tier=node.tier_rank, ranges=tuple(node.pfn_ranges),
                      managed_pages=node.managed_pages, free_pages=node.free_pages,
                      watermark_pages=max(node.watermark_high, node.watermark_promo or 0))
            for node in topology.nodes.values()
            if node.has_memory and node.tier_rank is not None]


def read_topology(root: HostRoot = HOST) -> Topology:
    """One snapshot of the host's memory topology. Raises KernelFileError only
    when zoneinfo or the node list is unusable."""
    zoneinfo = read_zoneinfo(root)
    node_ids = sysnodes.online_nodes(root)
    problems: list[str] = []
    cpus = {n: tuple(_cpus(n, root, problems)) for n in node_ids}
    zones = {n: zoneinfo.of_node(n) for n in node_ids}
    memory_nodes = [n for n in node_ids if any(z.managed for z in zones[n])]
    cpu_nodes = [n for n in node_ids if cpus[n]]
    tiers, rank_of = _tiers(node_ids, memory_nodes, cpu_nodes, root, problems)
    try:
        block_size = sysnodes.memory_block_size(root)
    except KernelFileError as e:
        problems.append(f"{e}; using zone spans")
        block_size = None
    nodes: dict[int, Node] = {}
    owned: list[tuple[int, int, int]] = []
    for n in node_ids:
        ranges = _node_ranges(n, zones[n], block_size, root, problems)
        owned += [(s, e, n) for s, e in ranges]
        nodes[n] = Node(
            id=n, cpus=cpus[n], tier_rank=rank_of.get(n), zones=zones[n],
            pfn_ranges=tuple(ranges),
            meminfo=_optional(partial(sysnodes.node_meminfo, n, root), problems),
            vmstat=_optional(partial(sysnodes.node_vmstat, n, root), problems),
        )
    owned.sort()
    return Topology(
        nodes=nodes, tiers=tuple(tiers), problems=tuple(problems),
        _starts=np.array([r[0] for r in owned], dtype=np.uint64),
        _ends=np.array([r[1] for r in owned], dtype=np.uint64),
        _owners=np.array([r[2] for r in owned], dtype=np.int32),
    )


def refresh_topology(previous: Topology, root: HostRoot = HOST) -> Topology:
    """The topology now, for the daemon's every interval: zoneinfo (free pages and
    watermarks) read again, the layout taken from `previous` while no node came or
    went and no zone was onlined, offlined or resized. Only a changed layout reads
    the memory blocks again (one file per block: 8192 at 1 TiB). The nodes' meminfo
    and vmstat, which no interval uses, are not read: they come back empty."""
    zoneinfo = read_zoneinfo(root)
    node_ids = sysnodes.online_nodes(root)
    zones = {n: zoneinfo.of_node(n) for n in node_ids}
    if node_ids != list(previous.nodes) or any(
            _layout(zones[n]) != _layout(node.zones) for n, node in previous.nodes.items()):
        return read_topology(root)
    return replace(previous, nodes={n: replace(node, zones=zones[n], meminfo={}, vmstat={})
                                    for n, node in previous.nodes.items()})


def _layout(zones: tuple[Zone, ...]) -> tuple[tuple[str, int | None, int, int], ...]:
    """What memory hotplug changes in a node's zones (their spans and present pages)."""
    return tuple((z.name, z.start_pfn, z.spanned, z.present) for z in zones)


def _cpus(node: int, root: HostRoot, problems: list[str]) -> list[int]:
    try:
        return sysnodes.node_cpus(node, root)
    except KernelFileError as e:
        problems.append(str(e))
        return []


def probe(root: HostRoot = HOST) -> list[Capability]:
    """Topology is usable when zoneinfo and the node list are; says where tiers came from."""
    try:
        topo = read_topology(root)
    except KernelFileError as e:
        return [Capability("topology", False, str(e))]
    sources = sorted({t.source for t in topo.tiers})
    note = (f"{len(topo.nodes)} nodes, {len(topo.tiers)} tiers from {'/'.join(sources)}")
    if topo.problems:
        note += f"; degraded: {'; '.join(topo.problems)}"
    return [Capability("topology", True, note)]
