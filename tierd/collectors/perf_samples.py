"""Perf-sample collector: one sampling event per online CPU, drained into SampleBatch.

Each CPU's event has its own mmap ring. A drain reads every ring (bytes
copied out in one or two slices), decodes the records in bulk and turns the
samples into PFNs at once, while the pages are still mapped: from PHYS_ADDR
where the kernel could translate, else from (pid, addr) through
/proc/PID/pagemap when the page is still present; the rest are counted as
unresolved. Records the kernel dropped (PERF_RECORD_LOST) are counted as lost.

A ring holds far less than one daemon interval of IBS samples, so a
background thread drains whenever a ring is half full (the events' wakeup
watermark, through poll) or every DRAIN_SECONDS; `collect()` drains once more
and hands over everything gathered since the last call.

Errors never escape as crashes: an event that cannot be opened (paranoid
setting, PMU gone, CPU offline) leaves the collector degraded or disabled
with the reason in `health`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tierd.collectors.evidence import SampleBatch
from tierd.errors import KernelFileError
from tierd.kernel import pagemap
from tierd.kernel import perf_event as pe
from tierd.kernel.pmu import OPTIONAL_SAMPLE_BITS, MemoryEvent, NoMemoryPmu, PmuError, memory_event
from tierd.kernel.root import HOST, HostRoot
from tierd.vocabulary import PAGE_SHIFT, Capability, Health, State

log = logging.getLogger(__name__)


CAP_SYS_ADMIN, CAP_PERFMON = 21, 38
DEFAULT_RING_PAGES = 64  # 256 KiB per CPU: ~4000 IBS samples between two drains
DRAIN_SECONDS = 0.25  # longest wait between two drains when no ring fills up

# (pid, vaddrs) -> PFN per vaddr, 0 where not present; raises KernelFileError.
Resolver = Callable[[int, npt.NDArray[np.uint64]], npt.NDArray[np.uint64]]


def online_cpus(root: HostRoot = HOST) -> list[int]:
    """CPUs listed in /sys/devices/system/cpu/online (ranges such as 0-3,8)."""
    text = root.read_text("/sys/devices/system/cpu/online").strip()
    cpus: list[int] = []
    try:
        for part in filter(None, text.split(",")):
            low, _, high = part.partition("-")
            cpus.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise KernelFileError(root("/sys/devices/system/cpu/online"),
                              f"not a CPU list: {text!r}") from None
    return cpus


@dataclass
class _CpuEvent:
    cpu: int
    fd: int
    ring: pe.PerfRing


@dataclass
class SampleStats:
    """Running totals since start, for metrics (no addresses)."""

    samples: int = 0
    lost: int = 0
    unresolved: int = 0
    other_records: int = 0
    by_source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(pe.SOURCES, 0))


class PerfSampleCollector:
    """Samples `event` on `cpus`; use as a context manager, or start()/close()."""

    name = "perf"

    def __init__(
        self,
        event: MemoryEvent,
        cpus: Sequence[int],
        ring_pages: int = DEFAULT_RING_PAGES,
        root: HostRoot = HOST,
        resolve: Resolver | None = None,
    ) -> None:
        self.event = event
        self.cpus = list(cpus)
        self.ring_pages = ring_pages
        self.root = root
        self._resolve = resolve or (lambda pid, vaddrs: pagemap.pfns_of(pid, vaddrs, root))
        self.sample_type = event.sample_type
        self.health = Health(State.DISABLED, "not started")
        self.stats = SampleStats()
        self._events: list[_CpuEvent] = []
        self._lock = threading.Lock()  # the rings and the pending results
        self._pending: list[npt.NDArray[np.uint64]] = []
        self._pending_lost = self._pending_unresolved = 0
        self._stop = threading.Event()
        self._drainer: threading.Thread | None = None

    def __enter__(self) -> PerfSampleCollector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, drain_in_background: bool = True) -> bool:
        """Open, map and enable the event on every CPU; False (and health says why) if none."""
        failures: list[str] = []
        for cpu in self.cpus:
            try:
                self._events.append(self._open_cpu(cpu))
            except pe.PerfOpenError as e:
                failures.append(f"cpu {cpu}: {e}")
            except OSError as e:  # mmap or ioctl
                failures.append(f"cpu {cpu}: mmap/enable: {e.strerror or e}")
        if not self._events:
            self.health = Health(State.DISABLED, "; ".join(failures) or "no CPUs")
            log.warning("perf collector unusable: %s", self.health.reason)
            return False
        if failures:
            self.health = Health(State.DEGRADED, "; ".join(failures))
            log.warning("perf collector degraded: %s", self.health.reason)
        else:
            self.health = Health(State.OK, self.event.description)
        if drain_in_background:
            self._stop.clear()
            self._drainer = threading.Thread(target=self._drain_loop, name="tierd-perf-drain",
                                             daemon=True)
            self._drainer.start()
        return True

    def _open_cpu(self, cpu: int) -> _CpuEvent:
        fd = self._open_with_fallback(cpu)
        try:
            ring = pe.PerfRing.map(fd, self.ring_pages)
            pe.enable(fd)
        except OSError:
            os.close(fd)
            raise
        return _CpuEvent(cpu, fd, ring)

    def _open_with_fallback(self, cpu: int) -> int:
        """Open on `cpu`; drop optional sample bits the PMU refuses (EINVAL), once for all CPUs."""
        droppable = [b for b in OPTIONAL_SAMPLE_BITS if self.sample_type & b]
        while True:
            what = f"{self.event.description}, cpu {cpu}"
            attr = self.event.attr(self.sample_type)
            attr.watermark = 1  # wake a poller once half the ring is used
            attr.wakeup_events = self.ring_pages * mmap.PAGESIZE // 2  # wakeup_watermark (union)
            try:
                return pe.perf_event_open(attr, -1, cpu, what)
            except pe.PerfOpenError as e:
                if e.errno != errno.EINVAL or not droppable:
                    raise
                self.sample_type &= ~droppable.pop(0)
                log.info("perf: %s refused a sample field, retrying with sample_type %#x",
                         self.event.pmu, self.sample_type)

    def _drain_loop(self) -> None:
        poller = select.poll()
        for event in self._events:
            poller.register(event.fd, select.POLLIN)
        while not self._stop.is_set():
            poller.poll(int(DRAIN_SECONDS * 1000))
            self.drain()
            self._stop.wait(0.01)  # at most 100 drains a second, whatever poll says

    def drain(self) -> None:
        """Read, decode and resolve whatever the rings hold, for the next collect()."""
        with self._lock:
            parts: list[npt.NDArray[np.void]] = []
            for event in self._events:
                try:
                    decoded = pe.decode(event.ring.read(), self.sample_type)
                except ValueError as e:  # a corrupt ring: skip it, keep the others
                    self._degrade(f"cpu {event.cpu}: {e}")
                    continue
                parts.append(decoded.samples)
                self._pending_lost += decoded.lost
                self.stats.other_records += decoded.other
            if not parts:
                return
            samples = np.concatenate(parts)
            pfns, unresolved = samples_to_pfns(samples, self._resolve)
            self._pending.append(pfns)
            self._pending_unresolved += unresolved
            self._count(samples)

    def collect(self) -> SampleBatch:
        """Everything sampled since the last collect(), as one SampleBatch."""
        self.drain()
        with self._lock:
            pfns = np.concatenate(self._pending) if self._pending else np.zeros(0, np.uint64)
            batch = SampleBatch(pfns=pfns, lost=self._pending_lost,
                                unresolved=self._pending_unresolved,
                                collected_at=time.monotonic())
            self.stats.lost += self._pending_lost
            self.stats.unresolved += self._pending_unresolved
            self._pending, self._pending_lost, self._pending_unresolved = [], 0, 0
        return batch

    def _count(self, samples: npt.NDArray[np.void]) -> None:
        self.stats.samples += samples.size
        if "data_src" in (samples.dtype.names or ()) and samples.size:
            sources = np.bincount(pe.memory_source(samples["data_src"]), minlength=len(pe.SOURCES))
            for name, count in zip(pe.SOURCES, sources, strict=True):
                self.stats.by_source[name] += int(count)

    def _degrade(self, reason: str) -> None:
        log.warning("perf collector degraded: %s", reason)
        self.health = Health(State.DEGRADED, reason)

    def close(self) -> None:
        """Stop draining, disable and close every event (safe to call twice)."""
        self._stop.set()
        if self._drainer is not None:
            self._drainer.join()
            self._drainer = None
        for event in self._events:
            with contextlib.suppress(OSError):  # closing below stops the event anyway
                pe.disable(event.fd)
            event.ring.close()
            os.close(event.fd)
        self._events = []


def samples_to_pfns(samples: npt.NDArray[np.void], resolve: Resolver
                    ) -> tuple[npt.NDArray[np.uint64], int]:
    """PFNs of the decoded samples that resolve, and how many did not.

    PHYS_ADDR wins where the kernel filled it; samples without it go through
    (pid, addr) and pagemap when the sample type has both, else count as
    unresolved.
    """
    names = samples.dtype.names or ()  # None for an unstructured array
    if "phys_addr" in names:
        phys = samples["phys_addr"]
        direct = phys[phys != 0] >> np.uint64(PAGE_SHIFT)
        pending = samples[phys == 0]
    else:
        direct = np.zeros(0, dtype=np.uint64)
        pending = samples
    if pending.size == 0 or "addr" not in names or "pid" not in names:
        return direct.astype(np.uint64), int(pending.size)
    resolved = resolve_through_pagemap(pending["pid"], pending["addr"], resolve)
    found = resolved[resolved != 0]
    return np.concatenate((direct, found)).astype(np.uint64), int(pending.size - found.size)


def resolve_through_pagemap(
    pids: npt.NDArray[np.uint32], addrs: npt.NDArray[np.uint64], resolve: Resolver
) -> npt.NDArray[np.uint64]:
    """PFN per (pid, addr) sample, 0 where the page is gone; one pagemap pass per pid."""
    out = np.zeros(addrs.size, dtype=np.uint64)
    order = np.argsort(pids, kind="stable")
    sorted_pids = pids[order]
    starts = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1]])
    ends = np.r_[starts[1:], sorted_pids.size]
    for start, end in zip(starts, ends, strict=True):
        pid = int(sorted_pids[start])
        idx = order[start:end]
        if pid == 0:  # the idle task or a kernel thread: no user mapping to look up
            continue
        try:
            out[idx] = resolve(pid, addrs[idx])
        except KernelFileError:  # the process exited, or pagemap is not readable
            continue
    return out


def _may_open_cpu_wide_events(paranoid: int) -> bool:
    """perf_event_paranoid >= 1 needs CAP_PERFMON (or CAP_SYS_ADMIN) for CPU-wide events."""
    if paranoid <= 0:
        return True
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return os.geteuid() == 0
    return bool(caps & (1 << CAP_PERFMON | 1 << CAP_SYS_ADMIN))


def probe(root: HostRoot = HOST) -> list[Capability]:
    """Which memory-sampling PMU this host has, and whether tierd may open CPU-wide events."""
    try:
        pmu = Capability("perf-pmu", True, memory_event(root).description)
    except (NoMemoryPmu, PmuError, KernelFileError) as e:
        pmu = Capability("perf-pmu", False, str(e))
    paranoid = pe.read_paranoid(root)
    if paranoid is None:
        events = Capability("perf-events", False,
                            f"{root(pe.PARANOID)} unreadable: kernel without perf events")
    elif _may_open_cpu_wide_events(paranoid):
        events = Capability("perf-events", True, f"perf_event_paranoid {paranoid}")
    else:
        events = Capability("perf-events", False, f"perf_event_paranoid {paranoid} forbids "
                            "CPU-wide events without CAP_PERFMON (run as root)")
    return [pmu, events]
