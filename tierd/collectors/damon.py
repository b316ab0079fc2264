"""DAMON collector: physical-address monitoring of the nodes' PFN ranges, as RegionBatch.

For kernels without idle-page tracking (Debian's stock kernel among them):
DAMON samples one page per region per sampling interval and adapts region
boundaries, so its cost is bounded by the region count, not by memory size.
tierd reads the regions with a `stat` scheme (see tierd.kernel.damon_sysfs).

The kdamond is tierd's only long-lived kernel-side state, so it never
outlives tierd: `stop()` runs from the context manager, from atexit, and
from the daemon's shutdown path, and is idempotent. A killed tierd cannot
stop it; the next one does, before starting its own (damon_sysfs.reclaim).
"""

from __future__ import annotations

import atexit
import logging
import time

import numpy as np
import numpy.typing as npt

from tierd.collectors.collector import Setup
from tierd.collectors.evidence import Evidence, RegionBatch
from tierd.collectors.processes import ProcessFilter
from tierd.collectors.topology import node_facts
from tierd.config import Config
from tierd.errors import KernelFileError, Unusable
from tierd.kernel import damon_sysfs, pagemap, task
from tierd.kernel.damon_sysfs import DamonError, Kdamond, MonitoringAttrs
from tierd.kernel.root import HOST, HostRoot
from tierd.vocabulary import PAGE_SHIFT, Capability, Health, State

log = logging.getLogger(__name__)

# Per page of a monitored process: its PFN, its region's access count and age.
_Pages = tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32], npt.NDArray[np.uint32]]


# DAMON (6.12, mm/damon/core.c) splits each region at random tenths of its size
# and merges a piece back into its neighbour when their access counts differ by
# at most a tenth of the samples, up to regions of monitored size / min_nr_regions.
# Hot pages at the edge of a hot set that fell into a cold region stay there
# while they are too small a share of the piece a split cuts for them (at least
# a tenth of the region) to be sampled: that fringe scales with the largest
# region. DAMON's default 10 lets a region be a tenth of all memory (512 MiB in
# the lab), which left up to 8.5% of a 64 MiB hot buffer reading unaccessed;
# with 100 (51 MiB) the edges settled within 0.3% of it. A kdamond over all
# memory may run up to max_nr_regions anyway; this raises only the floor.
PADDR_MIN_NR_REGIONS = 100


def paddr_attrs(sample_us: int = 5_000, aggr_us: int = 100_000) -> MonitoringAttrs:
    """Monitoring attributes for physical memory: no region larger than 1% of it."""
    return MonitoringAttrs(sample_us=sample_us, aggr_us=aggr_us,
                           min_nr_regions=PADDR_MIN_NR_REGIONS)


def _reclaim_then_check(root: HostRoot) -> str | None:
    """Stop what a killed tierd left running, then: None if DAMON is free, else why not."""
    try:
        damon_sysfs.reclaim(root)
    except DamonError as e:
        log.error("DAMON: cannot stop the kdamonds a previous tierd left running: %s", e)
    return damon_sysfs.availability(root)


def _unusable(reason: str) -> Health:
    log.warning("DAMON collector unusable: %s", reason)
    return Health(State.DISABLED, reason)


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
        self.attrs = attrs or paddr_attrs()
        self.root = root
        self.kdamond = Kdamond(root)
        self.health = Health(State.DISABLED, "not started")
        self._running = False

    def __enter__(self) -> DamonCollector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> bool:
        """Configure and start the kdamond; False (health says why) when DAMON is unusable."""
        why_not = _reclaim_then_check(self.root)
        if why_not:
            self.health = _unusable(why_not)
            return False
        byte_ranges = [(start << PAGE_SHIFT, end << PAGE_SHIFT) for start, end in self.pfn_ranges]
        try:
            self.kdamond.setup_paddr(byte_ranges, self.attrs)
            atexit.register(self.stop)  # before `on`: no window where it could outlive us
            self._running = True
            self.kdamond.start()
            damon_sysfs.note_started(self.root)
        except DamonError as e:
            self.stop()
            self.health = _unusable(str(e))
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
        damon_sysfs.forget_started(self.root)
        self.health = Health(State.DISABLED, "stopped")


def probe(root: HostRoot = HOST) -> Capability:
    """Whether tierd can run a paddr kdamond here (missing, busy, or not root)."""
    why_not = damon_sysfs.availability(root)
    return Capability("damon", why_not is None, why_not or "paddr monitoring through sysfs")


# Processes monitored at once, largest resident set first: each has its own
# kdamond (a kernel thread sampling every sampling_interval) and its snapshot
# waits for that kdamond's next aggregation, so the count is bounded...
MAX_PROCESS_TARGETS = 8
# ... and processes smaller than this (16 MiB of 4 KiB pages) are not worth one.
MIN_TARGET_PAGES = 4096
# Collects between two looks at which processes are the largest.
RESELECT_EVERY = 12


class ProcessDamonCollector:
    """DAMON vaddr monitoring of the largest processes, translated to PFNs (a RegionBatch).

    In virtual memory a process's hot and cold data stay apart however its
    pages are placed physically, so regions stay pure after pages move; paddr
    regions cover megabytes of physical memory and mix hot and cold pages
    once they interleave. Each region's access rate goes to the PFNs its
    present pages map (from /proc/PID/pagemap).
    """

    name = "damon"

    def __init__(self, process_filter: ProcessFilter, attrs: MonitoringAttrs | None = None,
                 root: HostRoot = HOST, max_targets: int = MAX_PROCESS_TARGETS) -> None:
        self.filter = process_filter
        self.attrs = attrs or MonitoringAttrs()
        self.root = root
        self.max_targets = max_targets
        self.health = Health(State.DISABLED, "not started")
        self._targets: list[tuple[int, Kdamond]] = []
        self._collects = 0
        self._running = False

    def start(self) -> bool:
        """Monitor the largest processes; False (health says why) when DAMON is unusable."""
        why_not = _reclaim_then_check(self.root)
        if why_not:
            self.health = _unusable(why_not)
            return False
        atexit.register(self.stop)
        self._running = True
        try:
            self._monitor(self._largest())
        except DamonError as e:
            self.stop()
            self.health = _unusable(str(e))
            return False
        self.health = Health(State.OK, f"vaddr, {len(self._targets)} processes")
        return True

    def _largest(self) -> list[int]:
        """The pids of the largest (resident) processes tierd may move, largest first."""
        sizes = []
        for pid in task.pids(self.root):
            try:
                if self.filter.excluded(pid) is not None:
                    continue
                resident = int(self.root.read_text(f"/proc/{pid}/statm").split()[1])
            except (KernelFileError, IndexError, ValueError):
                continue  # exited meanwhile, or a kernel thread's empty statm
            if resident >= MIN_TARGET_PAGES:
                sizes.append((resident, pid))
        return [pid for _, pid in sorted(sizes, reverse=True)[:self.max_targets]]

    def _monitor(self, pids: list[int]) -> None:
        """(Re)start one kdamond per pid; a pid that exits in between is left out."""
        for _, kdamond in self._targets:
            kdamond.stop()
        self._targets = []
        kdamonds = damon_sysfs.create_kdamonds(len(pids), self.root) if pids else []
        for pid, kdamond in zip(pids, kdamonds, strict=True):
            kdamond.setup_vaddr(pid, self.attrs)
        for pid, kdamond in zip(pids, kdamonds, strict=True):
            try:
                kdamond.start()
            except DamonError as e:
                log.info("DAMON: not monitoring pid %d: %s", pid, e.reason)
                continue
            self._targets.append((pid, kdamond))
        damon_sysfs.note_started(self.root)

    def collect(self) -> RegionBatch | None:
        """The targets' regions as per-PFN access counts; None (health degraded) on failure."""
        if not self._running:
            return None
        self._collects += 1
        try:
            gone = any(kd.state() != "on" for _, kd in self._targets)
            if gone or self._collects % RESELECT_EVERY == 0:
                pids = self._largest()
                if gone or set(pids) != {pid for pid, _ in self._targets}:
                    self._monitor(pids)
            parts = [self._evidence(pid, kd) for pid, kd in self._targets]
        except DamonError as e:
            self.health = Health(State.DEGRADED, str(e))
            log.warning("DAMON collector degraded: %s", e)
            return None
        self.health = Health(State.OK, f"vaddr, {len(self._targets)} processes")
        return _page_batch(parts, self.attrs.max_nr_accesses)

    def _evidence(self, pid: int, kdamond: Kdamond) -> _Pages:
        """(pfns, nr_accesses, age) of the present pages inside the process's regions."""
        empty = np.zeros(0, dtype=np.uint64)
        try:
            regions = kdamond.regions()
            maps = pagemap.scannable(pagemap.read_maps(pid, self.root))
            clipped = _clip(regions.start, regions.end, maps)
            if not clipped:
                return empty, empty.astype(np.uint32), empty.astype(np.uint32)
            entries = pagemap.read_ranges(pid, [(s, e) for s, e, _ in clipped], self.root)
        except pagemap.ProcessGoneError:
            return empty, empty.astype(np.uint32), empty.astype(np.uint32)
        pages = np.array([(e - s) >> PAGE_SHIFT for s, e, _ in clipped], dtype=np.intp)
        region = np.repeat(np.array([i for _, _, i in clipped], dtype=np.intp), pages)
        pfns = pagemap.pfn_of(entries)
        keep = pfns != 0  # present, and the PFN readable (pfn_of gives 0 otherwise)
        return pfns[keep], regions.nr_accesses[region[keep]], regions.age[region[keep]]

    def stop(self) -> None:
        """Stop every kdamond and release the directories (idempotent, never raises)."""
        if not self._running:
            return
        self._running = False
        atexit.unregister(self.stop)
        try:
            for _, kdamond in self._targets:  # release() refuses while any of them runs
                kdamond.stop()
            Kdamond(self.root).release()
        except DamonError as e:
            log.error("could not stop tierd's kdamonds: %s", e)
            self.health = Health(State.DEGRADED, f"stop failed: {e}")
            return
        damon_sysfs.forget_started(self.root)
        self._targets = []
        self.health = Health(State.DISABLED, "stopped")


def _clip(starts: npt.NDArray[np.uint64], ends: npt.NDArray[np.uint64], maps: list[pagemap.Mapping]
          ) -> list[tuple[int, int, int]]:
    """(start, end, region index) of each overlap of a region with a mapping.

    DAMON's vaddr regions may span holes between mappings; only mapped pages
    have pagemap entries worth reading. One step per overlap, not per page.
    """
    out = []
    for m in maps:
        first = int(np.searchsorted(ends, m.start, side="right"))
        last = int(np.searchsorted(starts, m.end, side="left"))
        for i in range(first, last):
            out.append((max(int(starts[i]), m.start), min(int(ends[i]), m.end), i))
    return out


def _page_batch(parts: list[_Pages],
                max_nr_accesses: int) -> RegionBatch:
    """Per-page evidence as a RegionBatch of PFN runs with the same counts."""
    pfns = np.concatenate([p for p, _, _ in parts] or [np.zeros(0, dtype=np.uint64)])
    accesses = np.concatenate([a for _, a, _ in parts] or [np.zeros(0, dtype=np.uint32)])
    ages = np.concatenate([g for _, _, g in parts] or [np.zeros(0, dtype=np.uint32)])
    order = np.argsort(pfns, kind="stable")
    pfns, accesses, ages = pfns[order], accesses[order], ages[order]
    # A run continues while the next PFN follows and has the same counts.
    breaks = np.ones(pfns.size, dtype=np.bool_)
    breaks[1:] = ((pfns[1:] != pfns[:-1] + np.uint64(1)) | (accesses[1:] != accesses[:-1])
                  | (ages[1:] != ages[:-1]))
    first = np.flatnonzero(breaks)
    last = np.append(first[1:], pfns.size)[:first.size] - 1
    return RegionBatch(pfn_start=pfns[first], pfn_end=pfns[last] + np.uint64(1),
                       nr_accesses=accesses[first], age=ages[first],
                       max_nr_accesses=max_nr_accesses, collected_at=time.monotonic())


class DamonFeed:
    """DAMON in the pipeline: one region snapshot per interval, from paddr or vaddr monitoring."""

    name = "damon"
    tracks_all_pages = False  # regions are sampled, not a census of user pages

    def __init__(self, monitor: DamonCollector | ProcessDamonCollector) -> None:
        self.monitor = monitor

    @property
    def health(self) -> Health:
        return self.monitor.health

    def collect(self, interval: float) -> Evidence:
        regions = self.monitor.collect()
        return Evidence(regions=[] if regions is None else [regions])

    def close(self) -> None:
        self.monitor.stop()


def open_collector(config: Config, setup: Setup) -> DamonFeed:
    cfg = config.collectors.damon
    sample_us = int(cfg.sampling_interval * 1e6)
    aggr_us = int(cfg.aggregation_interval * 1e6)
    monitor: DamonCollector | ProcessDamonCollector
    if cfg.operations == "vaddr":
        monitor = ProcessDamonCollector(setup.process_filter, MonitoringAttrs(sample_us, aggr_us),
                                        setup.root)
    else:
        ranges = [r for f in node_facts(setup.topology) for r in f.ranges]
        monitor = DamonCollector(ranges, paddr_attrs(sample_us, aggr_us), setup.root)
    if not monitor.start():
        raise Unusable(monitor.health)
    return DamonFeed(monitor)
