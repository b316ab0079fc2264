"""The Mover protocol: what the daemon asks of every way to move pages.

A mover is one module under tierd/movers with an `open_mover(config, setup)`
function, registered by its `movers.kind` name in tierd/movers/registry.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from tierd.collectors.collector import Setup
from tierd.collectors.processes import ProcessFilter
from tierd.config import Config
from tierd.movers.batches import BatchResult, MoverParams
from tierd.vocabulary import Batch


class Mover(Protocol):
    """Carries out the policy's batches; every PFN ends moved or not moved (with a reason)."""

    @property
    def name(self) -> str:
        """Its `movers.kind` ("phys", "pid"), as the metrics and the status report it."""
        ...

    def configure(self, params: MoverParams, process_filter: ProcessFilter) -> None:
        """Take a reloaded config's parameters and exclusions."""
        ...

    def refresh(self) -> list[str]:
        """Per-interval upkeep before the policy runs (the PID mover's reverse map); errors."""
        ...

    def known_pfns(self) -> npt.NDArray[np.uint64] | None:
        """The user pages the mover knows of, when it keeps a list of them (else None)."""
        ...

    def footprint(self) -> tuple[int, int]:
        """Entries and bytes of the mover's own page map (0, 0 without one)."""
        ...

    def reachable(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_] | None:
        """Which of `pfns` its page map can move (None without one: any page)."""
        ...

    def move(self, batch: Batch, flags: npt.NDArray[np.uint64] | None = None) -> BatchResult:
        """Move the batch; `flags`: its PFNs' kpageflags when the caller read them already."""
        ...


class MaplessMover:
    """The Mover methods of one that keeps no page map: upkeep, PFN list, footprint and
    reach none."""

    params = MoverParams()

    def configure(self, params: MoverParams, process_filter: ProcessFilter) -> None:
        self.params = params  # no process list: exclusions apply through the safety check

    def refresh(self) -> list[str]:
        return []

    def known_pfns(self) -> npt.NDArray[np.uint64] | None:
        return None

    def footprint(self) -> tuple[int, int]:
        return 0, 0

    def reachable(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_] | None:
        return None


# Opens the mover on `setup`'s host, or raises tierd.errors.Unusable saying why it cannot.
MoverOpener = Callable[[Config, Setup], Mover]


def mover_params(config: Config) -> MoverParams:
    m = config.movers
    shared = None if m.move_all_shared == "auto" else bool(m.move_all_shared)
    return MoverParams(batch_pages=m.batch_pages, move_all_shared=shared)
