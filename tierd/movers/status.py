"""The per-page status contract of move_pages(2) (and move_phys_pages), and a batch's result.

Each page's status is the node it is on after the call, or a negative errno:
-ENOENT not present, -EACCES shared or node not allowed, -EPERM mlocked,
-EBUSY busy (retried, bounded), -EFAULT not migratable, -ENOMEM target full
(stop moving to that node this interval), -EIO, -EINVAL. Every page not
moved is counted under a reason, so nothing is lost silently.
"""

from __future__ import annotations

import errno
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierd.kernel import numa

# Statuses after which the cached location of the page is wrong: it vanished,
# or something else lives there now.
STALE_ERRNOS = (errno.ENOENT, errno.EFAULT)


def reason_of(status: int, target: int) -> str:
    """Failure reason of one status: the errno's name, or "stayed_on_nodeN"."""
    if status >= 0:
        return f"stayed_on_node{status}" if status != target else "moved"
    return errno.errorcode.get(-status, f"errno{-status}")


def count_reasons(statuses: npt.NDArray[np.int32], target: int) -> Counter[str]:
    values, counts = np.unique(statuses, return_counts=True)
    return Counter({reason_of(int(v), target): int(c)
                    for v, c in zip(values, counts, strict=True)})


class _Parts:
    """A uint64 array grown by appending, joined once when read (not once per append)."""

    def __init__(self) -> None:
        self._parts: list[npt.NDArray[np.uint64]] = []

    def append(self, values: npt.NDArray[np.uint64]) -> None:
        if values.size:
            self._parts.append(values)

    def array(self) -> npt.NDArray[np.uint64]:
        if len(self._parts) != 1:
            self._parts = [np.concatenate(self._parts) if self._parts
                           else np.zeros(0, dtype=np.uint64)]
        return self._parts[0]


@dataclass(frozen=True)
class MoverParams:
    """Both movers' knobs (`movers.*` in the config)."""

    batch_pages: int = 512  # pages per call
    # MPOL_MF_MOVE_ALL: also pages mapped by several processes (else -EACCES;
    # move_pages needs CAP_SYS_NICE for it).
    move_all_shared: bool = False
    busy_retries: int = 3
    busy_backoff: float = 0.005  # seconds before the first retry; doubles each time

    @property
    def flags(self) -> int:
        return numa.MPOL_MF_MOVE_ALL if self.move_all_shared else numa.MPOL_MF_MOVE


class BatchResult:
    """What happened to one batch; every input PFN is in exactly one of moved / not_moved."""

    def __init__(self) -> None:
        self._moved = _Parts()  # old PFNs
        self._new_pfns = _Parts()  # parallel to moved; 0: unknown
        self._not_moved = _Parts()
        self._stale = _Parts()  # subset of not_moved
        self.failures: Counter[str] = Counter()
        self.target_full = False  # -ENOMEM: no more moves to this node this interval

    @property
    def moved(self) -> npt.NDArray[np.uint64]:
        return self._moved.array()

    @property
    def new_pfns(self) -> npt.NDArray[np.uint64]:
        return self._new_pfns.array()

    @property
    def not_moved(self) -> npt.NDArray[np.uint64]:
        return self._not_moved.array()

    @property
    def stale(self) -> npt.NDArray[np.uint64]:
        return self._stale.array()

    def succeed(self, pfns: npt.NDArray[np.uint64],
                new_pfns: npt.NDArray[np.uint64] | None = None) -> None:
        self._moved.append(pfns)
        self._new_pfns.append(np.zeros(pfns.size, np.uint64) if new_pfns is None else new_pfns)

    def fail(self, pfns: npt.NDArray[np.uint64], reason: str, stale: bool = False) -> None:
        if pfns.size:
            self._not_moved.append(pfns)
            self.failures[reason] += int(pfns.size)
            if stale:
                self._stale.append(pfns)

    def settle(self, pfns: npt.NDArray[np.uint64], statuses: npt.NDArray[np.int32],
               target: int) -> npt.NDArray[np.bool_]:
        """Count the pages of one call the kernel did not move; return which to retry (-EBUSY).

        Moved pages stay the caller's to record (only it knows their new PFNs).
        An -ENOMEM means the target is full: busy pages then fail as
        target_full and nothing is left to retry.
        """
        busy = statuses == -errno.EBUSY
        settled = (statuses != target) & ~busy
        if settled.any():
            self._not_moved.append(pfns[settled])
            stale = np.isin(statuses[settled], [-e for e in STALE_ERRNOS])
            self._stale.append(pfns[settled][stale])
            self.failures.update(count_reasons(statuses[settled], target))
        if (statuses == -errno.ENOMEM).any():
            self.target_full = True
            self.fail(pfns[busy], "target_full")
            return np.zeros_like(busy)
        return busy


# Moves the pages at these indices of a chunk (a slice: all of them); per-page
# statuses, OSError for the call.
MoveCall = Callable[[slice | npt.NDArray[np.intp]], npt.NDArray[np.int32]]


def _call_reason(e: OSError) -> str:
    return f"call_{errno.errorcode.get(e.errno or 0, e.errno)}"


def move_with_retries(call: MoveCall, pfns: npt.NDArray[np.uint64], target: int,
                      result: BatchResult, retries: int, backoff: float
                      ) -> npt.NDArray[np.bool_]:
    """Call until no page of the chunk is busy (at most 1 + `retries` times, backing off).

    Failures go into `result`; returns which of `pfns` reached the target,
    for the caller's own success bookkeeping.
    """
    moved = np.zeros(pfns.size, dtype=np.bool_)
    todo: slice | npt.NDArray[np.intp] = slice(None)  # the first call: views, not copies
    for attempt in range(retries + 1):
        try:
            status = call(todo)
        except OSError as e:
            gone = e.errno == errno.ESRCH
            result.fail(pfns[todo], "process_gone" if gone else _call_reason(e), stale=gone)
            # The kernel migrates in node batches; one that cannot allocate on the
            # target fails the whole call with ENOMEM: the target is full.
            result.target_full = e.errno == errno.ENOMEM
            return moved
        moved[todo] |= status == target
        busy = result.settle(pfns[todo], status, target)
        if not busy.any():
            return moved
        todo = np.flatnonzero(busy) if isinstance(todo, slice) else todo[busy]
        if attempt < retries:
            time.sleep(backoff)
            backoff *= 2
    result.fail(pfns[todo], "EBUSY")
    return moved
