"""The kernel's own tiering: kernel.numa_balancing and /sys/kernel/mm/numa/demotion_enabled.

numa_balancing is a bit mask since 5.18: 1 = classic NUMA balancing,
2 = NUMA_BALANCING_MEMORY_TIERING (promote hot pages from slow nodes).
demotion_enabled makes reclaim demote to a slower node instead of dropping.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierd.errors import KernelFileError
from tierd.kernel.root import HOST, HostRoot

NUMA_BALANCING = "/proc/sys/kernel/numa_balancing"
DEMOTION_ENABLED = "/sys/kernel/mm/numa/demotion_enabled"
MEMORY_TIERING = 2


@dataclass(frozen=True)
class KernelTiering:
    numa_balancing: int | None  # None: the file is missing (kernel without NUMA balancing)
    demotion_enabled: bool | None

    @property
    def promotes(self) -> bool:
        return bool(self.numa_balancing is not None and self.numa_balancing & MEMORY_TIERING)

    @property
    def active(self) -> bool:
        return self.promotes or bool(self.demotion_enabled)

    def describe(self) -> str:
        parts = []
        if self.promotes:
            parts.append(f"kernel.numa_balancing={self.numa_balancing}")
        if self.demotion_enabled:
            parts.append("demotion_enabled=true")
        return ", ".join(parts) or "off"


def _optional(root: HostRoot, path: str) -> str | None:
    try:
        return root.read_text(path).strip()
    except KernelFileError as e:
        if e.reason == "missing":
            return None
        raise


def read_kernel_tiering(root: HostRoot = HOST) -> KernelTiering:
    balancing = _optional(root, NUMA_BALANCING)
    demotion = _optional(root, DEMOTION_ENABLED)
    try:
        value = None if balancing is None else int(balancing)
    except ValueError:
        raise KernelFileError(root(NUMA_BALANCING), f"not an integer: {balancing!r}") from None
    if demotion not in (None, "true", "false", "1", "0"):
        raise KernelFileError(root(DEMOTION_ENABLED), f"not a boolean: {demotion!r}")
    enabled = None if demotion is None else demotion in ("true", "1")
    return KernelTiering(value, enabled)
