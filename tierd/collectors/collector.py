"""The Collector protocol: what the daemon asks of every evidence source.

A collector is one module under tierd/collectors with an `open_collector(config,
setup)` function, registered by its config section's name in
tierd/collectors/registry.py. The daemon only ever calls the protocol below.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tierd.collectors.evidence import Evidence
from tierd.collectors.processes import ProcessFilter
from tierd.collectors.topology import Topology
from tierd.config import Config
from tierd.kernel.root import HostRoot
from tierd.vocabulary import Health


class Collector(Protocol):
    """One source of access evidence, open from build time to close()."""

    @property
    def name(self) -> str:
        """The config section and the metrics label ("idle", "perf", "damon")."""
        ...

    @property
    def health(self) -> Health: ...

    # Its evidence tracks every user page (the idle bitmap does): the movers' own
    # page lists are then not needed to say which PFNs are candidates.
    @property
    def tracks_all_pages(self) -> bool: ...

    def collect(self, interval: float) -> Evidence:
        """This interval's evidence; `interval`: seconds until the next collect."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Pace:
    """How long work (a paced scan) waits and checks in: `pause` sleeps, `checkpoint`
    runs between chunks; the daemon's feed the watchdog and raise Interrupted on stop."""

    pause: Callable[[float], None] = time.sleep
    checkpoint: Callable[[], None] = lambda: None


UNPACED = Pace()  # plain sleeps, no checkpoint: tools and tests that run no daemon


@dataclass(frozen=True)
class Setup:
    """What a collector may need to open: the host, its nodes, who is excluded, the pace."""

    root: HostRoot
    topology: Topology
    process_filter: ProcessFilter
    interval: float  # seconds between two collects
    pace: Pace = UNPACED


# Opens the collector for `config` (whose section it reads) on `setup`'s host. It
# may come back with a disabled health (saying why); it is then closed, not used.
Opener = Callable[[Config, Setup], Collector]
