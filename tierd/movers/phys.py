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

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from tierd.collectors.collector import Setup
from tierd.collectors.processes import ProcessFilter
from tierd.config import Config
from tierd.errors import Unusable
from tierd.kernel import move_phys
from tierd.kernel.root import HOST, HostRoot
from tierd.movers import _native, folios
from tierd.movers.batches import BatchResult, MoverParams, move_groups
from tierd.movers.mover import mover_params
from tierd.vocabulary import PAGE_SHIFT, Batch, Health, State

# (physical addresses, target nodes, statuses to fill, flags) -> the call's result (0, or
# pages it failed to migrate); raises OSError for the call (move_phys_pages_into's signature).
MovePhysPages = Callable[[npt.NDArray[np.uint64], npt.NDArray[np.int32],
                          npt.NDArray[np.int32], int], int]


class PhysMover:
    name = "phys"

    def __init__(self, move_phys_pages: MovePhysPages, params: MoverParams | None = None,
                 root: HostRoot = HOST) -> None:
        self._move = move_phys_pages
        self.params = params or MoverParams()
        self.root = root

    def move(self, batch: Batch, flags: npt.NDArray[np.uint64] | None = None) -> BatchResult:
        """Move the batch; `flags`: its PFNs' kpageflags when the caller read them already
        (the daemon's safety check), else they are read here."""
        result = BatchResult()
        pfns = batch.pfns
        if not _native.ascends(pfns, False):  # a Batch's do; a caller's may not
            order = np.argsort(pfns)
            pfns, flags = pfns[order], None if flags is None else flags[order]
        first = (folios.read_group_starts(pfns, self.root) if flags is None
                 else folios.group_starts(pfns, flags))
        sent = pfns[first] << np.uint64(PAGE_SHIFT)  # one PFN per folio
        nodes = np.full(min(sent.size, self.params.batch_pages), batch.target, dtype=np.int32)

        def send(groups: slice | npt.NDArray[np.intp], statuses: npt.NDArray[np.int32]) -> int:
            addrs = sent[groups]
            return self._move(addrs, nodes[:addrs.size], statuses, self.params.flags)

        moved = move_groups(send, pfns, first, batch.target, result, self.params)
        result.succeed(pfns if moved.all() else pfns[moved])
        return result

    def configure(self, params: MoverParams, process_filter: ProcessFilter) -> None:
        self.params = params  # no process list: exclusions apply through the safety check

    def refresh(self) -> list[str]:
        return []

    def known_pfns(self) -> npt.NDArray[np.uint64] | None:
        return None

    def footprint(self) -> tuple[int, int]:
        return 0, 0


def open_mover(config: Config, setup: Setup) -> PhysMover:
    """move_phys_pages, only when its probe proved this kernel implements it."""
    support = move_phys.probe(setup.root)
    if not support.usable:
        raise Unusable(Health(State.DISABLED, f"move_phys_pages is unusable: {support.reason}"))
    return PhysMover(move_phys.move_phys_pages_into, mover_params(config), setup.root)
