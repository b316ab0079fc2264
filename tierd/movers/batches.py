"""How a batch is moved: calls by folio group, retries, and each page's status into a result.

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
from itertools import pairwise
from typing import cast

import numpy as np
import numpy.typing as npt

from tierd.kernel import numa
from tierd.movers import folios

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

    # Pages per call: each call drains every CPU's LRU caches (lru_cache_disable,
    # work queued on each CPU and waited for), so fewer, larger calls cost less.
    batch_pages: int = 8192
    # MPOL_MF_MOVE_ALL: also pages mapped by several processes (else -EACCES;
    # it needs CAP_SYS_NICE). None: as the mover's `shared_default` says.
    move_all_shared: bool | None = None
    busy_retries: int = 3
    busy_backoff: float = 0.005  # seconds before the first retry; doubles each time

    def flags(self, shared_default: bool) -> int:
        shared = shared_default if self.move_all_shared is None else self.move_all_shared
        return numa.MPOL_MF_MOVE_ALL if shared else numa.MPOL_MF_MOVE


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
               target: int) -> None:
        """Count the pages the kernel did not move, by reason: the batch's last word.

        Moved pages stay the caller's to record (only it knows their new PFNs).
        Pages still busy count as EBUSY, or as target_full once the target filled.
        """
        if self.target_full:
            busy = statuses == -errno.EBUSY
            self.fail(pfns[busy], "target_full")
            pfns, statuses = pfns[~busy], statuses[~busy]
        settled = statuses != target
        if settled.any():
            self._not_moved.append(pfns[settled])
            stale = np.isin(statuses[settled], [-e for e in STALE_ERRNOS])
            self._stale.append(pfns[settled][stale])
            self.failures.update(count_reasons(statuses[settled], target))


# Sends the folio groups at these indices (a slice on the first pass) in one call, their
# statuses, one per group, into the array given; returns the call's result (0, or how
# many pages the kernel failed to migrate), or raises OSError for the call.
SendGroups = Callable[[slice | npt.NDArray[np.intp], npt.NDArray[np.int32]], int]

NOT_SENT = np.iinfo(np.int32).min  # a group's status before (or without) a call
CALL_FAILED = NOT_SENT + 1  # its call failed as a whole; the reason is kept aside


def _call_reason(e: OSError) -> str:
    # move_pages fails a call with EACCES when the target is outside the task's
    # cpuset (move_phys_pages reports that per page).
    if e.errno == errno.EACCES:
        return "node_not_allowed"
    return f"call_{errno.errorcode.get(e.errno or 0, e.errno)}"


def group_chunks(first: npt.NDArray[np.bool_], batch_pages: int) -> list[int]:
    """Bounds, in group indices, of calls of at most `batch_pages` pages (folios whole)."""
    page_bounds = folios.chunk_bounds(first, batch_pages)
    if first.all():  # every page a group: the same bounds
        return page_bounds
    return [int(i) for i in np.searchsorted(np.flatnonzero(first), page_bounds)]


class _Sender:
    """Sends groups chunk by chunk into one status array; stops at a full target or a
    gone process, and keeps each failed call's groups and reason.

    Between two calls it runs no numpy computation, only the syscall and array
    views, so the per-call cost stays the kernel's. The kernel writes each
    call's statuses straight into the status array, and they are searched for
    -ENOMEM only after a call that reports pages it failed to migrate (the
    statuses of a call that returns 0 hold none).
    """

    def __init__(self, send: SendGroups, groups: int) -> None:
        self.send = send
        self.status = np.full(groups, NOT_SENT, dtype=np.int32)
        self.failed: list[tuple[slice | npt.NDArray[np.intp], str, bool]] = []
        self.stop: str | None = None  # why the groups not sent were not

    def run(self, pieces: list[slice | npt.NDArray[np.intp]]) -> None:
        for piece in pieces:
            if self.stop is not None:
                return
            # A slice's statuses are a view the kernel fills; retried groups' a copy.
            statuses = self.status[piece]
            try:
                not_migrated = self.send(piece, statuses)
            except OSError as e:
                gone = e.errno == errno.ESRCH
                self.failed.append((piece, "process_gone" if gone else _call_reason(e), gone))
                self.status[piece] = CALL_FAILED
                # A call that cannot allocate on the target fails with ENOMEM: it is full.
                self.stop = ("process_gone" if gone
                             else "target_full" if e.errno == errno.ENOMEM else None)
                continue
            if not isinstance(piece, slice):
                self.status[piece] = statuses
            if not_migrated and (statuses == -errno.ENOMEM).any():
                self.stop = "target_full"


def move_groups(send: SendGroups, pfns: npt.NDArray[np.uint64], first: npt.NDArray[np.bool_],
                target: int, result: BatchResult, params: MoverParams) -> npt.NDArray[np.bool_]:
    """Move pages by folio group in calls of at most params.batch_pages pages.

    One pass sends every chunk; then the groups still busy go again, all of
    them in one pass, after a backoff that doubles, at most busy_retries
    times. Per call this costs the syscall and a few array views: the status
    bookkeeping runs once over the whole batch. Failures go into `result`;
    returns which of `pfns` reached the target, for the caller's own success
    bookkeeping.
    """
    if pfns.size == 0:
        return np.zeros(0, dtype=np.bool_)
    # page -> its group; None: every page is a group (no large folio in the batch)
    group = None if first.all() else np.cumsum(first) - 1
    sender = _Sender(send, pfns.size if group is None else int(group[-1]) + 1)
    sender.run([slice(a, b) for a, b in pairwise(group_chunks(first, params.batch_pages))])
    if not sender.failed and (sender.status == target).all():  # the usual batch: all moved
        return np.ones(pfns.size, dtype=np.bool_)
    backoff = params.busy_backoff
    for _ in range(params.busy_retries):
        busy = sender.status == -errno.EBUSY
        if not busy.any() or sender.stop is not None:
            break
        time.sleep(backoff)
        backoff *= 2
        again = np.flatnonzero(busy)
        bounds = group_chunks(first[busy if group is None else busy[group]], params.batch_pages)
        sender.run([again[a:b] for a, b in pairwise(bounds)])
    return _settle_groups(sender, pfns, group, target, result)


def _settle_groups(sender: _Sender, pfns: npt.NDArray[np.uint64],
                   group: npt.NDArray[np.intp] | None, target: int, result: BatchResult
                   ) -> npt.NDArray[np.bool_]:
    if not sender.failed and (sender.status == target).all():  # the usual batch: all moved
        return np.ones(pfns.size, dtype=np.bool_)
    status = sender.status if group is None else sender.status[group]
    for piece, reason, stale in sender.failed:
        in_piece = np.zeros(sender.status.size, dtype=np.bool_)
        in_piece[piece] = True
        result.fail(pfns[in_piece if group is None else in_piece[group]], reason, stale=stale)
    # A -ENOMEM status or call stopped the sender: the target is full.
    result.target_full = sender.stop == "target_full"
    result.fail(pfns[status == NOT_SENT], sender.stop or "target_full",
                stale=sender.stop == "process_gone")
    answered = status > CALL_FAILED
    result.settle(pfns[answered], status[answered], target)
    return cast(npt.NDArray[np.bool_], status == target)
