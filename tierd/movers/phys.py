"""The phys mover: move pages by physical address with move_phys_pages (the tierd kernel).

Used only when the probe of tierd.kernel.move_phys proved the running kernel
implements the syscall. A batch's PFNs are grouped by folio
(tierd.movers.folios): one PFN per large folio goes to the kernel, which
moves the whole folio, and every PFN of the folio shares its status (sent
alone, the folio's other PFNs would report -ENOENT: isolated, then free).
Calls carry at most `batch_pages` pages, all to the batch's one target node,
and never split a folio. Per-page statuses follow move_pages(2): the node
reached or a negative errno; in the RFC -ENOENT means no longer an LRU page,
-EFAULT not migratable, -EACCES the target is outside an owner's cpuset.
Busy pages are retried (bounded, with backoff); -ENOMEM ends the batch. A
call-level error fails the chunk and the mover goes on.

The kernel does not report where a moved page went, so its heat cannot
follow it: the idle scan finds it again at its new PFN.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import numpy.typing as npt

from tierd.kernel.pagemap import PAGE_SHIFT
from tierd.kernel.root import HOST, HostRoot
from tierd.movers import folios
from tierd.movers.status import BatchResult
from tierd.policy import Batch

# (physical addresses, target nodes) -> per-page status; raises OSError for the call.
MovePhysPages = Callable[[npt.NDArray[np.uint64], npt.NDArray[np.int32]], npt.NDArray[np.int32]]


@dataclass(frozen=True)
class PhysMoverParams:
    batch_pages: int = 512
    busy_retries: int = 3
    busy_backoff: float = 0.005  # seconds before the first retry; doubles each time


class PhysMover:
    name = "phys"

    def __init__(self, move_phys_pages: MovePhysPages, params: PhysMoverParams | None = None,
                 root: HostRoot = HOST) -> None:
        self._move = move_phys_pages
        self.params = params or PhysMoverParams()
        self.root = root

    def move(self, batch: Batch) -> BatchResult:
        result = BatchResult()
        pfns = np.sort(batch.pfns)
        first = folios.read_group_starts(pfns, self.root)
        bounds = folios.chunk_bounds(first, self.params.batch_pages)
        for start, end in pairwise(bounds):
            if result.target_full:
                result.fail(pfns[start:end], "target_full")
                continue
            result.add(self._move_chunk(pfns[start:end], first[start:end], batch.target))
        return result

    def _move_chunk(self, pfns: npt.NDArray[np.uint64], first: npt.NDArray[np.bool_],
                    target: int) -> BatchResult:
        """Move whole folio groups; `first` marks the PFN sent for each group."""
        result = BatchResult()
        backoff = self.params.busy_backoff
        for attempt in range(self.params.busy_retries + 1):
            sent = pfns[first]
            try:
                status = self._move(sent << np.uint64(PAGE_SHIFT),
                                    np.full(sent.size, target, dtype=np.int32))
            except OSError as e:
                result.fail(pfns, f"call_{errno.errorcode.get(e.errno or 0, e.errno)}")
                result.target_full = e.errno == errno.ENOMEM  # a node batch could not allocate
                return result
            status = folios.spread(first, status)
            result.succeed(pfns[status == target])
            busy = result.settle(pfns, status, target)
            if not busy.any():
                return result
            pfns, first = pfns[busy], first[busy]
            if attempt < self.params.busy_retries:
                time.sleep(backoff)
                backoff *= 2
        result.fail(pfns, "EBUSY")
        return result
