"""Memory tiers: the kernel's own (/sys/devices/virtual/memory_tiering), else derived.

Since 6.1 the kernel groups nodes into memory_tierN directories, N being the
abstract distance divided by the chunk size (128): a higher N is a slower
tier. Where that directory is missing (older kernels, or tiering compiled
out) we derive tiers the way mm/memory-tiers.c does from HMAT access
attributes, relative to the nodes with CPUs; without HMAT data, from the SLIT
distance to the nearest node with CPUs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tierd.kernel import nodes as sysnodes
from tierd.kernel.root import HOST, HostRoot

TIERS_DIR = "/sys/devices/virtual/memory_tiering"

# mm/memory-tiers.c: MEMTIER_CHUNK_BITS and MEMTIER_ADISTANCE_DRAM.
CHUNK_BITS = 7
ADISTANCE_DRAM = (4 << CHUNK_BITS) + (1 << (CHUNK_BITS - 1))

UNREACHABLE = 255  # the SLIT's "no path" distance

SOURCE_KERNEL = "memory_tiering"
SOURCE_HMAT = "hmat"
SOURCE_DISTANCE = "distance"
SOURCE_NONE = "none"  # nothing readable: every memory node in one tier


@dataclass(frozen=True)
class MemoryTier:
    """Nodes of one tier; `id` orders tiers (lower is faster)."""

    id: int
    nodes: tuple[int, ...]
    source: str  # SOURCE_KERNEL, SOURCE_HMAT or SOURCE_DISTANCE


def kernel_tiers(root: HostRoot = HOST) -> list[MemoryTier] | None:
    """The kernel's memory_tierN directories, sorted fast to slow; None if absent."""
    base = root(TIERS_DIR)
    if not base.is_dir():
        return None
    tiers = []
    for entry in base.glob("memory_tier*"):
        suffix = entry.name.removeprefix("memory_tier")
        if not suffix.isdigit():
            continue
        nodelist_path = f"{TIERS_DIR}/{entry.name}/nodelist"
        nodes = sysnodes.parse_cpulist(root.read_text(nodelist_path), str(root(nodelist_path)))
        if nodes:
            tiers.append(MemoryTier(int(suffix), tuple(nodes), SOURCE_KERNEL))
    return sorted(tiers, key=lambda t: t.id) or None


def _group(tier_of: dict[int, int], source: str) -> list[MemoryTier]:
    members: dict[int, list[int]] = defaultdict(list)
    for node, tier in sorted(tier_of.items()):
        members[tier].append(node)
    return [MemoryTier(t, tuple(ns), source) for t, ns in sorted(members.items())]


def hmat_tiers(
    memory_nodes: list[int], cpu_nodes: list[int], root: HostRoot = HOST
) -> list[MemoryTier] | None:
    """Tiers from HMAT access attributes, as the kernel computes abstract distance.

    The reference ("DRAM") performance is that of the fastest node with CPUs.
    None when any memory node or every CPU node lacks HMAT data.
    """
    maybe = {n: sysnodes.node_access_perf(n, root) for n in memory_nodes}
    perf = {n: p for n, p in maybe.items() if p is not None}
    refs = [perf[n] for n in cpu_nodes if n in perf]
    if len(perf) < len(maybe) or not refs:
        return None
    ref = min(refs, key=lambda p: p.read_latency_ns + p.write_latency_ns)
    ref_latency = ref.read_latency_ns + ref.write_latency_ns
    ref_bandwidth = ref.read_bandwidth_mbps + ref.write_bandwidth_mbps
    tier_of = {}
    for node, p in perf.items():
        bandwidth = max(p.read_bandwidth_mbps + p.write_bandwidth_mbps, 1)
        adist = (ADISTANCE_DRAM * (p.read_latency_ns + p.write_latency_ns) // ref_latency
                 * ref_bandwidth // bandwidth)
        tier_of[node] = adist >> CHUNK_BITS
    return _group(tier_of, SOURCE_HMAT)


def distance_tiers(
    memory_nodes: list[int], cpu_nodes: list[int], root: HostRoot = HOST
) -> list[MemoryTier]:
    """Tiers by SLIT distance from the nearest node with CPUs (10 = local)."""
    initiators = cpu_nodes or memory_nodes
    distances = {n: sysnodes.node_distances(n, root) for n in initiators}
    tier_of = {
        node: min((distances[i][node] for i in initiators if node < len(distances[i])),
                  default=UNREACHABLE)
        for node in memory_nodes
    }
    return _group(tier_of, SOURCE_DISTANCE)


def read_tiers(
    memory_nodes: list[int], cpu_nodes: list[int], root: HostRoot = HOST
) -> list[MemoryTier]:
    """The best available tiering of `memory_nodes`, fast to slow."""
    return (kernel_tiers(root)
            or hmat_tiers(memory_nodes, cpu_nodes, root)
            or distance_tiers(memory_nodes, cpu_nodes, root))
