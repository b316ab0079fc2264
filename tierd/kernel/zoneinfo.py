"""/proc/zoneinfo: per-zone watermarks, sizes and PFN spans, and per-node stats.

Format (mm/vmstat.c, zoneinfo_show_print): a "Node N, zone NAME" header; the
first populated zone of a node carries a "per-node stats" block; then
"pages free", boost, min, low, high, promo (6.x kernels with memory tiering;
absent on older ones), spanned, present, managed, cma, "protection: (...)";
populated zones go on with zone stats, pagesets and finally "start_pfn:".
All figures are in pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierd.errors import KernelFileError
from tierd.kernel.root import HOST, HostRoot

ZONEINFO = "/proc/zoneinfo"

_REQUIRED = ("free", "min", "low", "high", "spanned", "present", "managed")


@dataclass(frozen=True)
class Zone:
    """One zone of one node; counts in pages."""

    node: int
    name: str
    free: int
    min: int
    low: int
    high: int
    promo: int | None  # the promotion watermark; None where the kernel has none
    spanned: int
    present: int
    managed: int
    start_pfn: int | None  # None for an unpopulated zone (the kernel omits it)
    stats: dict[str, int] = field(default_factory=dict)  # nr_free_pages, numa_hit, ...

    @property
    def end_pfn(self) -> int | None:
        return None if self.start_pfn is None else self.start_pfn + self.spanned

    @property
    def populated(self) -> bool:
        return self.present > 0


@dataclass(frozen=True)
class ZoneInfo:
    zones: tuple[Zone, ...]
    node_stats: dict[int, dict[str, int]]  # node -> the "per-node stats" block

    def of_node(self, node: int) -> tuple[Zone, ...]:
        return tuple(z for z in self.zones if z.node == node)


class _ZoneBuilder:
    def __init__(self, node: int, name: str) -> None:
        self.node = node
        self.name = name
        self.fields: dict[str, int] = {}
        self.stats: dict[str, int] = {}

    def build(self, path: str) -> Zone:
        missing = [k for k in _REQUIRED if k not in self.fields]
        if missing:
            raise KernelFileError(
                path, f"zone lacks {', '.join(missing)}", key=f"Node {self.node}, zone {self.name}"
            )
        f = self.fields
        return Zone(
            node=self.node, name=self.name, free=f["free"], min=f["min"], low=f["low"],
            high=f["high"], promo=f.get("promo"), spanned=f["spanned"],
            present=f["present"], managed=f["managed"], start_pfn=f.get("start_pfn"),
            stats=self.stats,
        )


def _header(line: str) -> tuple[int, str] | None:
    """(node, zone) of a "Node 0, zone   Normal" line."""
    if not line.startswith("Node "):
        return None
    node_part, _, zone_part = line.partition(",")
    return int(node_part.split()[1]), zone_part.split()[1]


_ZONE_FIELDS = frozenset(("boost", "min", "low", "high", "promo", "spanned", "present",
                          "managed", "cma"))


def parse_zoneinfo(text: str, path: str = ZONEINFO) -> ZoneInfo:
    """Parse the text of /proc/zoneinfo; KernelFileError names the bad line."""
    zones: list[Zone] = []
    node_stats: dict[int, dict[str, int]] = {}
    zone: _ZoneBuilder | None = None
    in_node_stats = False
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            header = _header(line)
            if header is not None:
                if zone is not None:
                    zones.append(zone.build(path))
                zone = _ZoneBuilder(*header)
                in_node_stats = False
                continue
            words = line.split()
            if not words or zone is None:
                continue
            if words == ["per-node", "stats"]:
                in_node_stats = True
                node_stats[zone.node] = {}
            elif words[:2] == ["pages", "free"]:
                in_node_stats = False
                zone.fields["free"] = int(words[2])
            elif words[0] == "start_pfn:":
                zone.fields["start_pfn"] = int(words[1])
            elif words[0] in _ZONE_FIELDS and len(words) == 2:
                zone.fields[words[0]] = int(words[1])
            elif len(words) == 2 and words[0].isidentifier() and words[1].isdigit():
                target = node_stats[zone.node] if in_node_stats else zone.stats
                target[words[0]] = int(words[1])
        except (ValueError, IndexError):
            raise KernelFileError(path, f"cannot parse {line.strip()!r}",
                                  key=f"line {lineno}") from None
    if zone is not None:
        zones.append(zone.build(path))
    if not zones:
        raise KernelFileError(path, "no zones")
    return ZoneInfo(tuple(zones), node_stats)


def read_zoneinfo(root: HostRoot = HOST) -> ZoneInfo:
    return parse_zoneinfo(root.read_text(ZONEINFO), str(root(ZONEINFO)))
