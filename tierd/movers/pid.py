"""The PID mover: PFNs -> (pid, vaddr) through the reverse map, then move_pages(2) per process.

For each process owning pages of a batch: re-read its pagemap for those
addresses and keep only pages still at the PFN the policy chose (the rest
are stale: the reverse map is repaired, nothing else is touched), then call
move_pages with at most
`batch_pages` pages a call, all to the batch's one target node (the kernel
flushes its internal batch whenever the target changes or a page is not
queued). Pages are grouped by folio (tierd.movers.folios; here a group also
needs consecutive virtual pages): one address per large folio goes to the
kernel, which moves the whole folio, where the folio's other addresses would
each find it isolated (-EBUSY, a retry after a backoff) and flush the
kernel's batch. Busy pages are retried a bounded number of times with
exponential backoff; -ENOMEM ends the batch (the target is full). Call-level
errors (process gone, permission, cpuset) fail that process's pages and the
batch goes on. The kernel itself refuses a target outside the task's cpuset
(move_pages checks every page's node against it and fails the call with
EACCES, counted as node_not_allowed), so no Mems_allowed read races it here.

A page mapped by several processes needs MPOL_MF_MOVE_ALL, and then the
kernel checks only the called task's cpuset, not the other mappers'. So the
mover checks them first. A page whose pagemap entry (read anyway for the
stale check) lacks PM_MMAP_EXCLUSIVE is mapped more than once: it moves
only when the reverse map knows every mapper (as many entries as
/proc/kpagecount says) and each one's Mems_allowed_list holds the target;
otherwise it stays, counted as `mapper_unknown` or `mapper_not_allowed`. A
cpuset changed between that read and the call is the one window left; the
phys mover's kernel closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from tierd.collectors.collector import Setup
from tierd.collectors.processes import ProcessFilter
from tierd.config import Config
from tierd.errors import KernelFileError
from tierd.kernel import kpageflags as kpf
from tierd.kernel import numa, pagemap, task
from tierd.kernel.pagemap import ProcessGoneError
from tierd.kernel.root import HOST, HostRoot
from tierd.movers import folios
from tierd.movers.batches import BatchResult, MoverParams, move_groups
from tierd.movers.mover import mover_params
from tierd.movers.rmap import ReverseMap
from tierd.vocabulary import Batch

log = logging.getLogger(__name__)

# move_pages into a status array (tierd.kernel.numa.move_pages_into's signature).
MovePages = Callable[[int, npt.NDArray[np.uint64], npt.NDArray[np.int32],
                      npt.NDArray[np.int32], int], int]


# Shared pages too, unless the config says no: the mover checks every mapper's cpuset,
# which move_pages(2) with MPOL_MF_MOVE_ALL does not (_check_mappers).
SHARED_DEFAULT = True


class PidMover:
    name = "pid"

    def __init__(self, rmap: ReverseMap, params: MoverParams | None = None,
                 root: HostRoot = HOST, move_pages: MovePages = numa.move_pages_into) -> None:
        self.rmap = rmap
        self.params = params or MoverParams()
        self.root = root
        self._move_pages = move_pages

    def move(self, batch: Batch, flags: npt.NDArray[np.uint64] | None = None) -> BatchResult:
        """Move the batch; `flags`: its PFNs' kpageflags when the caller read them already
        (the daemon's safety check), else they are read here."""
        result = BatchResult()
        pfns = batch.pfns
        missing, processes = self.rmap.by_process(pfns)
        if missing is not None:
            result.fail(pfns[missing], "not_in_rmap", stale=True)
        flags = self._flags(pfns) if flags is None else flags
        for pid, pages, vaddrs in processes:
            if result.target_full:
                result.fail(pfns[pages], "target_full")
                continue
            self._move_process(pid, pfns[pages], vaddrs, flags[pages], batch.target, result)
        # The policy picks moved pages again by their new PFNs (the heat follows
        # them), so the map must follow them too, not wait for a refresh.
        self.rmap.moved(result.moved, result.new_pfns)
        self.rmap.invalidate(result.stale)
        return result

    @property
    def _move_flags(self) -> int:
        return self.params.flags(shared_default=SHARED_DEFAULT)

    def configure(self, params: MoverParams, process_filter: ProcessFilter) -> None:
        self.params = params
        self.rmap.filter = process_filter

    def refresh(self) -> list[str]:
        return self.rmap.refresh().errors

    def known_pfns(self) -> npt.NDArray[np.uint64] | None:
        return self.rmap.pfn

    def footprint(self) -> tuple[int, int]:
        return self.rmap.pages, self.rmap.nbytes

    def reachable(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_] | None:
        return self.rmap.holds(pfns)

    def _still_movable(self, pfns: npt.NDArray[np.uint64], entries: npt.NDArray[np.uint64],
                       target: int, result: BatchResult) -> npt.NDArray[np.bool_]:
        """Which pages are still at the PFN the policy chose (their pagemap `entries`, read
        now) and, when shared, allowed at `target` by every mapper; the rest fail."""
        keep: npt.NDArray[np.bool_] = (entries & pagemap.PFN_MASK) == pfns
        if not keep.all():
            result.fail(pfns[~keep], "stale_rmap", stale=True)
        if self._move_flags == numa.MPOL_MF_MOVE_ALL:
            self._check_mappers(pfns, entries, keep, target, result)
        return keep

    def _check_mappers(self, pfns: npt.NDArray[np.uint64], entries: npt.NDArray[np.uint64],
                       keep: npt.NDArray[np.bool_], target: int, result: BatchResult) -> None:
        """Clear `keep` where a shared page may not go to `target` as far as its other
        mappers go, failing it into `result`. A page its pagemap entry says is mapped
        once (PM_MMAP_EXCLUSIVE: the kernel's precise mapcount is 1) passes unchecked."""
        at = np.flatnonzero(keep & ((entries & pagemap.EXCLUSIVE) == 0))
        if at.size == 0:
            return
        with kpf.kpagecount(self.root) as count_file:
            mapcount = count_file.read_at(pfns[at])
        which, pids = self.rmap.holders_of(pfns[at])
        unknown = np.bincount(which, minlength=at.size) < mapcount
        procs, inverse = np.unique(pids, return_inverse=True)
        allows = np.array([self._allows(int(pid), target) for pid in procs], dtype=np.bool_)
        barred = np.bincount(which[~allows[inverse]], minlength=at.size) > 0
        for refused, reason in ((unknown, "mapper_unknown"),
                                (barred & ~unknown, "mapper_not_allowed")):
            if refused.any():
                result.fail(pfns[at[refused]], reason)
                keep[at[refused]] = False

    def _allows(self, pid: int, target: int) -> bool:
        """Whether the process's cpuset allows `target` (no when it cannot be read)."""
        try:
            return target in task.mems_allowed(pid, self.root)
        except KernelFileError as e:
            log.debug("pid %d: %s", pid, e)
            return False

    def _flags(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """The kpageflags of each of `pfns`."""
        with kpf.kpageflags(self.root) as flags_file:
            return flags_file.read_at(pfns)

    def _move_process(self, pid: int, pfns: npt.NDArray[np.uint64],
                      vaddrs: npt.NDArray[np.uint64], flags: npt.NDArray[np.uint64],
                      target: int, result: BatchResult) -> None:
        try:
            mapped = pagemap.Pagemap(pid, self.root)  # read before and after the move
        except KernelFileError as e:
            _unreadable(pid, pfns, e, result)
            return
        with mapped:
            try:
                entries = mapped.entries_of(vaddrs)
            except KernelFileError as e:
                _unreadable(pid, pfns, e, result)
                return
            keep = self._still_movable(pfns, entries, target, result)
            if not keep.all():
                pfns, vaddrs, flags = pfns[keep], vaddrs[keep], flags[keep]
            first = folios.group_starts(pfns, flags, vaddrs)
            sent = vaddrs if first.all() else vaddrs[first]  # one address per folio
            nodes = np.full(min(sent.size, self.params.batch_pages), target, dtype=np.int32)

            def send(groups: slice | npt.NDArray[np.intp],
                     statuses: npt.NDArray[np.int32]) -> int:
                addrs = sent[groups]
                return self._move_pages(pid, addrs, nodes[:addrs.size], statuses,
                                        self._move_flags)

            moved = move_groups(send, pfns, first, target, result, self.params)
            if not moved.all():
                pfns, vaddrs = pfns[moved], vaddrs[moved]
            if pfns.size:
                result.succeed(pfns, _new_pfns(mapped, vaddrs))


def _unreadable(pid: int, pfns: npt.NDArray[np.uint64], error: KernelFileError,
                result: BatchResult) -> None:
    """The process's pagemap could not be read: its pages stay, counted."""
    if isinstance(error, ProcessGoneError):
        result.fail(pfns, "process_gone", stale=True)
    else:
        log.debug("pid %d: %s", pid, error)
        result.fail(pfns, "proc_unreadable")


def _new_pfns(mapped: pagemap.Pagemap, vaddrs: npt.NDArray[np.uint64]
              ) -> npt.NDArray[np.uint64]:
    """Where the moved pages live now (0 where the process is gone or it vanished)."""
    try:
        return mapped.pfns_of(vaddrs)
    except KernelFileError:
        return np.zeros(vaddrs.size, dtype=np.uint64)


def open_mover(config: Config, setup: Setup) -> PidMover:
    """move_pages(2) through a reverse map of the processes tierd may touch."""
    return PidMover(ReverseMap(setup.process_filter, setup.root), mover_params(config),
                    setup.root)
