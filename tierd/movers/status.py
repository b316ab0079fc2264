"""The per-page status contract of move_pages(2) (and move_phys_pages), and a batch's result.

Each page's status is the node it is on after the call, or a negative errno:
-ENOENT not present, -EACCES shared or node not allowed, -EPERM mlocked,
-EBUSY busy (retried, bounded), -EFAULT not migratable, -ENOMEM target full
(stop moving to that node this interval), -EIO, -EINVAL. Every page not
moved is counted under a reason, so nothing is lost silently.
"""

from __future__ import annotations

import errno
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

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


def _empty() -> npt.NDArray[np.uint64]:
    return np.zeros(0, dtype=np.uint64)


@dataclass
class BatchResult:
    """What happened to one batch; every input PFN is in exactly one of moved / not_moved."""

    moved: npt.NDArray[np.uint64] = field(default_factory=_empty)  # old PFNs
    new_pfns: npt.NDArray[np.uint64] = field(default_factory=_empty)  # parallel; 0: unknown
    not_moved: npt.NDArray[np.uint64] = field(default_factory=_empty)
    stale: npt.NDArray[np.uint64] = field(default_factory=_empty)  # subset of not_moved
    failures: Counter[str] = field(default_factory=Counter)
    target_full: bool = False  # -ENOMEM: no more moves to this node this interval
    interrupted: bool = False  # stopped early (target full or shutdown)

    def add(self, other: BatchResult) -> None:
        self.moved = np.concatenate((self.moved, other.moved))
        self.new_pfns = np.concatenate((self.new_pfns, other.new_pfns))
        self.not_moved = np.concatenate((self.not_moved, other.not_moved))
        self.stale = np.concatenate((self.stale, other.stale))
        self.failures.update(other.failures)
        self.target_full |= other.target_full
        self.interrupted |= other.interrupted

    def succeed(self, pfns: npt.NDArray[np.uint64],
                new_pfns: npt.NDArray[np.uint64] | None = None) -> None:
        self.moved = np.concatenate((self.moved, pfns))
        new = np.zeros(pfns.size, np.uint64) if new_pfns is None else new_pfns
        self.new_pfns = np.concatenate((self.new_pfns, new))

    def fail(self, pfns: npt.NDArray[np.uint64], reason: str, stale: bool = False) -> None:
        if pfns.size:
            self.not_moved = np.concatenate((self.not_moved, pfns))
            self.failures[reason] += int(pfns.size)
            if stale:
                self.stale = np.concatenate((self.stale, pfns))

    def _fail_statuses(self, pfns: npt.NDArray[np.uint64], statuses: npt.NDArray[np.int32],
                      target: int) -> None:
        """Pages the kernel did not move, counted by their per-page status."""
        if pfns.size:
            self.not_moved = np.concatenate((self.not_moved, pfns))
            stale = np.isin(statuses, [-e for e in STALE_ERRNOS])
            self.stale = np.concatenate((self.stale, pfns[stale]))
            self.failures.update(count_reasons(statuses, target))

    def settle(self, pfns: npt.NDArray[np.uint64], statuses: npt.NDArray[np.int32],
               target: int) -> npt.NDArray[np.bool_]:
        """Count the pages of one call the kernel did not move; return which to retry (-EBUSY).

        Moved pages stay the caller's to record (only it knows their new PFNs).
        An -ENOMEM means the target is full: busy pages then fail as
        target_full and nothing is left to retry.
        """
        busy = statuses == -errno.EBUSY
        settled = (statuses != target) & ~busy
        self._fail_statuses(pfns[settled], statuses[settled], target)
        if (statuses == -errno.ENOMEM).any():
            self.target_full = True
            self.fail(pfns[busy], "target_full")
            return np.zeros_like(busy)
        return busy
