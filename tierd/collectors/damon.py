"""DAMON collector: physical-address monitoring of the nodes' PFN ranges, as RegionBatch.

For kernels without idle-page tracking (Debian's stock kernel among them):
DAMON samples one page per region per sampling interval and adapts region
boundaries, so its cost is bounded by the region count, not by memory size.
tierd reads the regions with a `stat` scheme (see tierd.kernel.damon_sysfs).

The kdamond is tierd's only long-lived kernel-side state, so it never
outlives tierd: `stop()` runs from the context manager, from atexit, and
from the daemon's shutdown path, and is idempotent.
"""

from __future__ import annotations

import atexit
import logging
import time

import numpy as np

from tierd.collectors.evidence import RegionBatch
from tierd.kernel import damon_sysfs
from tierd.kernel.damon_sysfs import DamonError, Kdamond, MonitoringAttrs
from tierd.kernel.pagemap import PAGE_SHIFT
from tierd.kernel.root import HOST, HostRoot
from tierd.probe import Capability, Health, State

log = logging.getLogger(__name__)


class DamonCollector:
    """Monitors the PFN ranges [start, end) given; use as a context manager or start()/stop()."""

    name = "damon"

    def __init__(
        self,
        pfn_ranges: list[tuple[int, int]],
        attrs: MonitoringAttrs | None = None,
        root: HostRoot = HOST,
    ) -> None:
        if not pfn_ranges:
            raise ValueError("DAMON needs at least one PFN range to monitor")
        self.pfn_ranges = sorted(pfn_ranges)
        self.attrs = attrs or MonitoringAttrs()
        self.root = root
        self.kdamond = Kdamond(root)
        self.health = Health(State.UNAVAILABLE, "not started")
        self._running = False

    def __enter__(self) -> DamonCollector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> bool:
        """Configure and start the kdamond; False (health says why) when DAMON is unusable."""
        why_not = damon_sysfs.availability(self.root)
        if why_not:
            self.health = Health(State.UNAVAILABLE, why_not)
            log.warning("DAMON collector unusable: %s", why_not)
            return False
        byte_ranges = [(start << PAGE_SHIFT, end << PAGE_SHIFT) for start, end in self.pfn_ranges]
        try:
            self.kdamond.setup_paddr(byte_ranges, self.attrs)
            atexit.register(self.stop)  # before `on`: no window where it could outlive us
            self._running = True
            self.kdamond.start()
        except DamonError as e:
            self.stop()
            self.health = Health(State.UNAVAILABLE, str(e))
            log.warning("DAMON collector unusable: %s", e)
            return False
        self.health = Health(State.OK, "paddr")
        return True

    def collect(self) -> RegionBatch | None:
        """The regions of the next aggregation interval; None (health degraded) on failure."""
        if not self._running:
            return None
        try:
            if self.kdamond.state() != "on":
                raise DamonError(self.root(f"{self.kdamond.base}/state"),
                                 "kdamond stopped on its own (targets gone, or turned off)")
            regions = self.kdamond.regions()
        except DamonError as e:
            self.health = Health(State.DEGRADED, str(e))
            log.warning("DAMON collector degraded: %s", e)
            return None
        self.health = Health(State.OK, "paddr")
        shift = np.uint64(PAGE_SHIFT)
        return RegionBatch(
            pfn_start=regions.start >> shift,
            pfn_end=(regions.end + np.uint64((1 << PAGE_SHIFT) - 1)) >> shift,
            nr_accesses=regions.nr_accesses,
            age=regions.age,
            max_nr_accesses=self.attrs.max_nr_accesses,
            collected_at=time.monotonic(),
        )

    def stop(self) -> None:
        """Stop the kdamond and release its sysfs directories (idempotent, never raises)."""
        if not self._running:
            return
        self._running = False
        atexit.unregister(self.stop)
        try:
            self.kdamond.release()
        except DamonError as e:
            log.error("could not stop tierd's kdamond: %s", e)
            self.health = Health(State.DEGRADED, f"stop failed: {e}")
            return
        self.health = Health(State.UNAVAILABLE, "stopped")


def probe(root: HostRoot = HOST) -> Capability:
    """Whether tierd can run a paddr kdamond here (missing, busy, or not root)."""
    why_not = damon_sysfs.availability(root)
    return Capability("damon", why_not is None, why_not or "paddr monitoring through sysfs")
