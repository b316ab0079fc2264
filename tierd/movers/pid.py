"""The PID mover: PFNs -> (pid, vaddr) through the reverse map, then move_pages(2) per process.

For each process owning pages of a batch: check the target node is in its
Mems_allowed, re-read its pagemap for those addresses and keep only pages
still at the PFN the policy chose (the rest are stale: the reverse map is
repaired, nothing else is touched), then call move_pages in chunks of
`batch_pages`, all to the batch's one target node (the kernel flushes its
internal batch whenever the target changes or a page is not queued).
Busy pages are retried a bounded number of times with exponential backoff;
-ENOMEM ends the batch (the target is full). Call-level errors (process
gone, permission, cpuset) fail that process's pages and the batch goes on.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError
from tierd.kernel import numa, pagemap
from tierd.kernel.pagemap import ProcessGoneError
from tierd.kernel.root import HOST, HostRoot
from tierd.movers import safety
from tierd.movers.rmap import ReverseMap
from tierd.movers.status import BatchResult
from tierd.policy import Batch

log = logging.getLogger(__name__)

MovePages = Callable[..., npt.NDArray[np.int32]]


@dataclass(frozen=True)
class PidMoverParams:
    batch_pages: int = 512  # pages per move_pages call
    move_all_shared: bool = False  # MPOL_MF_MOVE_ALL (needs CAP_SYS_NICE)
    busy_retries: int = 3
    busy_backoff: float = 0.005  # seconds before the first retry; doubles each time


class PidMover:
    name = "pid"

    def __init__(self, rmap: ReverseMap, params: PidMoverParams | None = None,
                 root: HostRoot = HOST, move_pages: MovePages = numa.move_pages) -> None:
        self.rmap = rmap
        self.params = params or PidMoverParams()
        self.root = root
        self._move_pages = move_pages
        self.flags = numa.MPOL_MF_MOVE_ALL if self.params.move_all_shared else numa.MPOL_MF_MOVE

    def move(self, batch: Batch) -> BatchResult:
        result = BatchResult()
        found, pids, vaddrs = self.rmap.lookup(batch.pfns)
        result.fail(batch.pfns[~found], "not_in_rmap", stale=True)
        pfns, pids, vaddrs = batch.pfns[found], pids[found], vaddrs[found]
        order = np.lexsort((vaddrs, pids))
        pfns, pids, vaddrs = pfns[order], pids[order], vaddrs[order]
        bounds = np.flatnonzero(np.diff(pids)) + 1
        for group in np.split(np.arange(pids.size), bounds):
            if group.size == 0:
                continue
            if result.target_full:
                result.fail(pfns[group], "target_full")
                continue
            result.add(self._move_process(int(pids[group[0]]), pfns[group], vaddrs[group],
                                          batch.target))
        self.rmap.invalidate(result.stale)
        return result

    def _move_process(self, pid: int, pfns: npt.NDArray[np.uint64],
                      vaddrs: npt.NDArray[np.uint64], target: int) -> BatchResult:
        result = BatchResult()
        try:
            allowed = safety.allowed_nodes(pid, self.root)
            current = pagemap.pfns_of(pid, vaddrs, self.root)
        except ProcessGoneError:
            result.fail(pfns, "process_gone", stale=True)
            return result
        except KernelFileError as e:
            log.debug("pid %d: %s", pid, e)
            result.fail(pfns, "proc_unreadable")
            return result
        if allowed is not None and target not in allowed:
            result.fail(pfns, "node_not_allowed")
            return result
        same = current == pfns
        result.fail(pfns[~same], "stale_rmap", stale=True)
        pfns, vaddrs = pfns[same], vaddrs[same]
        step = self.params.batch_pages
        for start in range(0, pfns.size, step):
            chunk = slice(start, start + step)
            if result.target_full:
                result.fail(pfns[chunk], "target_full")
                continue
            result.add(self._move_chunk(pid, pfns[chunk], vaddrs[chunk], target))
        return result

    def _move_chunk(self, pid: int, pfns: npt.NDArray[np.uint64],
                    vaddrs: npt.NDArray[np.uint64], target: int) -> BatchResult:
        result = BatchResult()
        backoff = self.params.busy_backoff
        for attempt in range(self.params.busy_retries + 1):
            try:
                status = self._move_pages(pid, vaddrs, np.full(vaddrs.size, target, np.int32),
                                          self.flags)
            except numa.MovePagesError as e:
                gone = e.errno == errno.ESRCH
                reason = "process_gone" if gone else f"call_{errno.errorcode.get(e.errno, e.errno)}"
                result.fail(pfns, reason, stale=gone)
                # The kernel migrates in node batches; one that cannot allocate on the
                # target fails the whole call with ENOMEM: the target is full.
                result.target_full = e.errno == errno.ENOMEM
                return result
            moved = status == target
            if moved.any():
                result.succeed(pfns[moved], self._new_pfns(pid, vaddrs[moved]))
            busy = result.settle(pfns, status, target)
            if not busy.any():
                return result
            pfns, vaddrs = pfns[busy], vaddrs[busy]
            if attempt < self.params.busy_retries:
                time.sleep(backoff)
                backoff *= 2
        result.fail(pfns, "EBUSY")
        return result

    def _new_pfns(self, pid: int, vaddrs: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """Where the moved pages live now (0 where the process is gone or it vanished)."""
        try:
            return pagemap.pfns_of(pid, vaddrs, self.root)
        except KernelFileError:
            return np.zeros(vaddrs.size, dtype=np.uint64)
