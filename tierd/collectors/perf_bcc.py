"""bcc backend of the perf-sample collector: count samples per page in a BPF hash map.

The same events as the ctypes ring (one per online CPU) run a BPF
perf-event program instead of writing records: it adds one to a hash map
keyed by (pid, page-aligned virtual address). A BPF perf-event program sees
only the sample's virtual `addr`, never a physical address, so each
interval Python drains the map in batches (BPF_MAP_LOOKUP_AND_DELETE_BATCH
into numpy arrays) and resolves the pages through /proc/PID/pagemap. High
sample rates then cost no per-sample work in Python, only per distinct page.

bcc comes from Debian's python3-bpfcc and compiles the program at start, so
it needs kernel headers: /lib/modules/$(uname -r)/build, or the kernel's own
/sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS). Without them the backend is
unusable and `perf_collector` falls back to the ctypes ring, saying why.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from tierd.collectors.evidence import SampleBatch
from tierd.collectors.perf_samples import (
    PerfSampleCollector,
    Resolver,
    SampleStats,
    resolve_through_pagemap,
)
from tierd.kernel import pagemap
from tierd.kernel import perf_event as pe
from tierd.kernel.pmu import MemoryEvent
from tierd.kernel.root import HOST, HostRoot
from tierd.vocabulary import PAGE_SIZE, Capability, Health, State

log = logging.getLogger(__name__)

MAX_PAGES = 1 << 18  # distinct (pid, page) per interval; more are counted as lost
KEY_DTYPE = np.dtype([("pid", "<u4"), ("pad", "<u4"), ("page", "<u8")])
COUNTER_DROPPED, COUNTER_NO_ADDR = 0, 1

BPF_PROGRAM = r"""
#include <uapi/linux/bpf_perf_event.h>

struct page_key {
    u32 pid;
    u32 pad;
    u64 page;
};

BPF_HASH(pages, struct page_key, u64, MAX_PAGES);
BPF_ARRAY(counters, u64, 2);  /* [0] map full, [1] sample without an address */

static inline void bump(int index)
{
    u64 *counter = counters.lookup(&index);
    if (counter)
        __sync_fetch_and_add(counter, 1);
}

int on_sample(struct bpf_perf_event_data *ctx)
{
    struct page_key key = {};
    u64 zero = 0, *count;

    if (ctx->addr == 0) {
        bump(1);
        return 0;
    }
    key.pid = bpf_get_current_pid_tgid() >> 32;
    key.page = ctx->addr & ~((u64)TIERD_PAGE_SIZE - 1);
    count = pages.lookup_or_try_init(&key, &zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        bump(0);
    return 0;
}
"""


def kernel_headers(root: HostRoot = HOST) -> str | None:
    """Where bcc will find kernel headers for the running kernel, or None."""
    release = os.uname().release
    for path in (f"/lib/modules/{release}/build", "/sys/kernel/kheaders.tar.xz"):
        if root(path).exists():
            return path
    return None


def unusable_reason(root: HostRoot = HOST) -> str | None:
    """Why the bcc backend cannot run here (None when it can), without changing anything."""
    try:
        import bcc  # noqa: F401 (Debian's python3-bpfcc; optional)
    except ImportError as e:
        return f"bcc not installed (Debian package python3-bpfcc): {e}"
    if kernel_headers(root) is None:
        return (f"no kernel headers for {os.uname().release}: neither /lib/modules/"
                f"{os.uname().release}/build nor /sys/kernel/kheaders.tar.xz (CONFIG_IKHEADERS)")
    return None


class BccSampleCollector:
    """PerfSampleCollector's interface, with per-page counts aggregated in the kernel."""

    name = "perf"

    def __init__(
        self,
        event: MemoryEvent,
        cpus: Sequence[int],
        root: HostRoot = HOST,
        resolve: Resolver | None = None,
        max_pages: int = MAX_PAGES,
    ) -> None:
        self.event = event
        self.cpus = list(cpus)
        self.root = root
        self.max_pages = max_pages
        self._resolve = resolve or (lambda pid, vaddrs: pagemap.pfns_of(pid, vaddrs, root))
        self.health = Health(State.DISABLED, "not started")
        self.stats = SampleStats()
        self._bpf: Any = None
        self._program_fd = -1
        self._fds: list[int] = []
        self._counters = np.zeros(2, dtype=np.uint64)

    def __enter__(self) -> BccSampleCollector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> bool:
        """Compile, load and attach on every CPU; False (health says why) when bcc cannot."""
        reason = unusable_reason(self.root)
        if reason is None:
            reason = self._load()
        if reason is None:
            reason = self._attach()
        if reason is not None:
            self.close()
            self.health = Health(State.DISABLED, f"bcc backend: {reason}")
            return False
        if self.health.state is not State.DEGRADED:  # some CPUs may have failed to attach
            self.health = Health(State.OK, f"bcc: {self.event.description}")
        return True

    def _load(self) -> str | None:
        from bcc import BPF

        try:
            self._bpf = BPF(text=BPF_PROGRAM, cflags=[
                "-w",  # kernel headers under clang warn by the dozen; errors still show
                f"-DMAX_PAGES={self.max_pages}", f"-DTIERD_PAGE_SIZE={PAGE_SIZE}"])
            self._program_fd = self._bpf.load_func(b"on_sample", BPF.PERF_EVENT).fd
        except Exception as e:  # bcc raises bare Exception for compile and load errors
            return f"could not compile or load the BPF program: {e}"
        return None

    def _attach(self) -> str | None:
        from bcc.libbcc import lib

        failures = []
        # The program ignores sample_type: it reads addr from the sample data itself.
        attr = self.event.attr(pe.SAMPLE_ADDR)
        attr.size = ctypes.sizeof(attr)
        for cpu in self.cpus:
            fd = lib.bpf_attach_perf_event_raw(
                self._program_fd, ctypes.byref(attr), -1, cpu, -1, ctypes.c_ulong(0))
            if fd < 0:
                err = ctypes.get_errno()
                failures.append(f"cpu {cpu}: {pe.reason_for(err) if err else 'attach failed'}")
            else:
                self._fds.append(fd)
        if not self._fds:
            return "; ".join(failures)
        if failures:
            self.health = Health(State.DEGRADED, "; ".join(failures))
        return None

    def collect(self) -> SampleBatch:
        """Drain the per-page counts into a SampleBatch (one PFN entry per sample)."""
        if self._bpf is None:
            return SampleBatch(np.zeros(0, np.uint64), 0, 0, time.monotonic())
        keys, counts = drain(self._bpf["pages"].map_fd, self.max_pages)
        dropped, no_addr = self._counter_deltas()
        pfns = resolve_through_pagemap(keys["pid"], keys["page"], self._resolve)
        found = pfns != 0
        unresolved = int(counts[~found].sum()) + no_addr
        samples = np.repeat(pfns[found], counts[found].astype(np.intp))
        self.stats.samples += int(counts.sum()) + no_addr
        self.stats.lost += dropped
        self.stats.unresolved += unresolved
        return SampleBatch(pfns=samples, lost=dropped, unresolved=unresolved,
                           collected_at=time.monotonic())

    def _counter_deltas(self) -> tuple[int, int]:
        table = self._bpf["counters"]
        now = np.array([table[ctypes.c_int(i)].value for i in range(2)], dtype=np.uint64)
        delta = now - self._counters
        self._counters = now
        return int(delta[COUNTER_DROPPED]), int(delta[COUNTER_NO_ADDR])

    def close(self) -> None:
        """Detach every event and unload the program (safe to call twice)."""
        for fd in self._fds:
            os.close(fd)  # closing the perf fd detaches the program
        self._fds = []
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def drain(map_fd: int, capacity: int) -> tuple[npt.NDArray[np.void], npt.NDArray[np.uint64]]:
    """Look up and delete every entry of the pages map, in batches, into numpy arrays.

    A sample that lands on an entry between its copy and its deletion is lost;
    the window is one bucket's worth of work, so the loss is negligible.
    """
    from bcc.libbcc import lib

    keys = np.zeros(capacity, dtype=KEY_DTYPE)
    values = np.zeros(capacity, dtype=np.uint64)
    token = ctypes.c_uint32(0)
    count = ctypes.c_uint32(0)
    total = 0
    while total < capacity:
        count.value = capacity - total
        rc = lib.bpf_lookup_and_delete_batch(
            map_fd, ctypes.byref(token) if total else None, ctypes.byref(token),
            ctypes.c_void_p(keys.ctypes.data + total * KEY_DTYPE.itemsize),
            ctypes.c_void_p(values.ctypes.data + total * values.itemsize), ctypes.byref(count),
        )
        err = ctypes.get_errno()
        total += count.value
        if rc != 0:
            if err == errno.ENOENT:  # the whole map has been read
                break
            raise OSError(err, f"BPF_MAP_LOOKUP_AND_DELETE_BATCH: {os.strerror(err)}")
        if count.value == 0:
            break
    return keys[:total], values[:total]


def perf_collector(
    backend: str, event: MemoryEvent, cpus: Sequence[int], root: HostRoot = HOST
) -> PerfSampleCollector | BccSampleCollector:
    """A started perf collector of the configured backend; the ctypes ring when bcc cannot run."""
    why_not_bcc = ""
    if backend == "bcc":
        bcc_collector = BccSampleCollector(event, cpus, root)
        if bcc_collector.start():
            return bcc_collector
        why_not_bcc = bcc_collector.health.reason
        log.warning("%s; falling back to the ctypes ring", why_not_bcc)
    collector = PerfSampleCollector(event, cpus, root=root)
    collector.start()
    if why_not_bcc and collector.health.state is State.OK:
        collector.health = Health(State.OK, f"ctypes ring ({why_not_bcc})")
    return collector


def probe(root: HostRoot = HOST) -> Capability:
    reason = unusable_reason(root)
    if reason is not None:
        return Capability("perf-bcc", False, reason)
    return Capability("perf-bcc", True, f"kernel headers: {kernel_headers(root)}")
