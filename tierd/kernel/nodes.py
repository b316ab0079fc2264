"""/sys/devices/system/node and /sys/devices/system/memory: NUMA nodes and memory blocks.

Per node: CPUs (cpulist), meminfo (converted to bytes), vmstat (including
pgpromote_* / pgdemote_*), SLIT distances, HMAT access attributes
(access0/initiators: the performance seen from the node's nearest
initiator), and the memory blocks linked from the node directory. Memory
blocks (memoryN, block_size_bytes in hex) give each node's PFN ranges with
holes left out.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from tierd.errors import KernelFileError
from tierd.kernel.root import HOST, HostRoot

NODE_DIR = "/sys/devices/system/node"
MEMORY_DIR = "/sys/devices/system/memory"

_MEMINFO_LINE = re.compile(r"Node\s+\d+\s+(\S+?):\s+(\d+)(\s+kB)?$")


def parse_cpulist(text: str, path: str = "cpulist") -> list[int]:
    """Expand a kernel list such as "0-3,8,10-11" (cpulist, nodelist, online)."""
    items: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        try:
            items.extend(range(int(first), int(last or first) + 1))
        except ValueError:
            raise KernelFileError(path, f"bad list item {part!r}") from None
    return items


def online_nodes(root: HostRoot = HOST) -> list[int]:
    path = f"{NODE_DIR}/online"
    return parse_cpulist(root.read_text(path), str(root(path)))


def node_cpus(node: int, root: HostRoot = HOST) -> list[int]:
    path = f"{NODE_DIR}/node{node}/cpulist"
    return parse_cpulist(root.read_text(path), str(root(path)))


def parse_meminfo(text: str, path: str = "meminfo") -> dict[str, int]:
    """A node's meminfo: "Node 0 MemTotal: 2024424 kB" -> {"MemTotal": bytes}."""
    result: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = _MEMINFO_LINE.match(line.strip())
        if match is None:
            raise KernelFileError(path, f"cannot parse {line.strip()!r}", key=f"line {lineno}")
        key, value, kb = match.groups()
        result[key] = int(value) * (1024 if kb else 1)
    return result


def node_meminfo(node: int, root: HostRoot = HOST) -> dict[str, int]:
    path = f"{NODE_DIR}/node{node}/meminfo"
    return parse_meminfo(root.read_text(path), str(root(path)))


def parse_vmstat(text: str, path: str = "vmstat") -> dict[str, int]:
    """ "name value" lines -> {name: value}."""
    result: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        try:
            name, value = words
            result[name] = int(value)
        except ValueError:
            raise KernelFileError(path, f"cannot parse {line.strip()!r}",
                                  key=f"line {lineno}") from None
    return result


def node_vmstat(node: int, root: HostRoot = HOST) -> dict[str, int]:
    path = f"{NODE_DIR}/node{node}/vmstat"
    return parse_vmstat(root.read_text(path), str(root(path)))


def node_distances(node: int, root: HostRoot = HOST) -> list[int]:
    """SLIT distances from `node` to every possible node, in node order."""
    path = f"{NODE_DIR}/node{node}/distance"
    text = root.read_text(path)
    try:
        return [int(d) for d in text.split()]
    except ValueError:
        raise KernelFileError(root(path), f"cannot parse {text.strip()!r}") from None


@dataclass(frozen=True)
class AccessPerf:
    """HMAT access attributes of a memory node as seen from its best initiator."""

    read_latency_ns: int
    write_latency_ns: int
    read_bandwidth_mbps: int
    write_bandwidth_mbps: int


def node_access_perf(node: int, root: HostRoot = HOST) -> AccessPerf | None:
    """access0/initiators/{read,write}_{latency,bandwidth}; None without HMAT data."""
    base = f"{NODE_DIR}/node{node}/access0/initiators"
    if not root(base).is_dir():
        return None
    values: dict[str, int] = {}
    for name in ("read_latency", "write_latency", "read_bandwidth", "write_bandwidth"):
        path = f"{base}/{name}"
        if not root(path).exists():
            return None
        text = root.read_text(path).strip()
        try:
            values[name] = int(text)
        except ValueError:
            raise KernelFileError(root(path), f"not a number: {text!r}") from None
    return AccessPerf(values["read_latency"], values["write_latency"],
                      values["read_bandwidth"], values["write_bandwidth"])


def memory_block_size(root: HostRoot = HOST) -> int | None:
    """Bytes per memory block (block_size_bytes is hex); None without the directory."""
    path = f"{MEMORY_DIR}/block_size_bytes"
    if not root(path).exists():
        return None
    text = root.read_text(path).strip()
    try:
        return int(text, 16)
    except ValueError:
        raise KernelFileError(root(path), f"not a hex number: {text!r}") from None


@dataclass(frozen=True)
class MemoryBlock:
    index: int  # memoryN: covers bytes [N * block size, (N + 1) * block size)
    node: int
    online: bool


def node_memory_blocks(node: int, root: HostRoot = HOST) -> list[MemoryBlock]:
    """The memory blocks linked from nodeN/ (memoryN symlinks), sorted."""
    node_dir = root(f"{NODE_DIR}/node{node}")
    try:
        names = os.listdir(node_dir)
    except OSError as e:
        raise KernelFileError(node_dir, e.strerror or str(e)) from None
    blocks = []
    for name in names:
        suffix = name.removeprefix("memory")
        if suffix == name or not suffix.isdigit():
            continue
        state_path = f"{MEMORY_DIR}/memory{suffix}/state"
        online = root.read_text(state_path).strip() == "online"
        blocks.append(MemoryBlock(int(suffix), node, online))
    return sorted(blocks, key=lambda b: b.index)
