"""The phys mover: move pages by physical address with move_phys_pages (the tierd kernel).

Used only when the probe of tierd.kernel.move_phys proved the running kernel
implements the syscall. A batch goes down in chunks of `batch_pages`, all to
its one target node. Per-page statuses follow move_pages(2): the node
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

import numpy as np
import numpy.typing as npt

from tierd.kernel.pagemap import PAGE_SHIFT
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

    def __init__(self, move_phys_pages: MovePhysPages, params: PhysMoverParams | None = None
                 ) -> None:
        self._move = move_phys_pages
        self.params = params or PhysMoverParams()

    def move(self, batch: Batch) -> BatchResult:
        result = BatchResult()
        step = self.params.batch_pages
        for start in range(0, batch.pfns.size, step):
            chunk = batch.pfns[start:start + step]
            if result.target_full:
                result.fail(chunk, "target_full")
                continue
            result.add(self._move_chunk(chunk, batch.target))
        return result

    def _move_chunk(self, pfns: npt.NDArray[np.uint64], target: int) -> BatchResult:
        result = BatchResult()
        backoff = self.params.busy_backoff
        for attempt in range(self.params.busy_retries + 1):
            try:
                status = self._move(pfns << np.uint64(PAGE_SHIFT),
                                    np.full(pfns.size, target, dtype=np.int32))
            except OSError as e:
                result.fail(pfns, f"call_{errno.errorcode.get(e.errno or 0, e.errno)}")
                result.target_full = e.errno == errno.ENOMEM  # a node batch could not allocate
                return result
            moved = status == target
            result.succeed(pfns[moved])
            busy = status == -errno.EBUSY
            settled = ~moved & ~busy
            result.fail_statuses(pfns[settled], status[settled], target)
            if (status == -errno.ENOMEM).any():
                result.target_full = True
                result.fail(pfns[busy], "target_full")
                return result
            if not busy.any():
                return result
            pfns = pfns[busy]
            if attempt < self.params.busy_retries:
                time.sleep(backoff)
                backoff *= 2
        result.fail(pfns, "EBUSY")
        return result
