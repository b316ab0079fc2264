"""The words every layer shares: pages, directions, node facts, batches, health.

A leaf module: it imports nothing from tierd, so the kernel readers, the
collectors, the pure policy core, the movers and the service can all use
the same types without importing each other (see docs/design.md, "Layers").
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1


class Direction(StrEnum):
    PROMOTE = "promote"  # towards a faster tier
    DEMOTE = "demote"  # towards a slower tier


class State(StrEnum):
    """How a collector (or capability) is doing; the value is the metrics label."""

    OK = "ok"
    DEGRADED = "degraded"  # working, but part of its input failed (see reason)
    DISABLED = "disabled"  # cannot work on this host, or not started (see reason)


@dataclass(frozen=True)
class Capability:
    """One thing tierd may use on this host, and whether it can."""

    name: str
    usable: bool
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Health:
    """A collector's (or mover's) current state and why."""

    state: State = State.OK
    reason: str = ""

    def capability(self, name: str) -> Capability:
        """As a probe result: usable unless disabled; degraded says so in the reason."""
        reason = f"degraded: {self.reason}" if self.state is State.DEGRADED else self.reason
        return Capability(name, self.state is not State.DISABLED, reason)


@dataclass(frozen=True)
class NodeFacts:
    """What the host says about a node (from the topology), before policy parameters apply."""

    node: int
    tier: int  # rank, 0 = fastest
    ranges: tuple[tuple[int, int], ...]  # [start, end) PFNs of this node
    managed_pages: int
    free_pages: int
    watermark_pages: int  # max(high, promo): where the kernel itself starts to worry


@dataclass(frozen=True)
class Batch:
    """PFNs to move from one node to one other, in one direction."""

    direction: Direction
    source: int
    target: int
    pfns: npt.NDArray[np.uint64]  # ascending
