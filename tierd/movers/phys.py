"""The phys mover: move pages by physical address with move_phys_pages (the tierd kernel).

Used only when the probe of tierd.kernel.move_phys proved the running kernel
implements the syscall. Every PFN of a batch goes to the kernel as it is,
large folios included: the kernel moves the whole folio for the first PFN
naming it, and every later PFN of that folio in the same call (or the same
PFN twice) gets the folio's status without a new lookup; in a later call the
folio is already on the target. So each PFN's status is the truth about that
PFN, and the counts by reason are counts of pages. Calls carry at most
`batch_pages` pages, all to the batch's one target node.

Per-page statuses (docs/move_phys_pages.md): the node reached, or -ENOENT not
user memory (free, kernel, unmapped), -EFAULT not migratable, -EACCES shared
without MPOL_MF_MOVE_ALL, -EPERM the target is outside a mapper's cpuset or
MPOL_BIND policy, -EBUSY busy for now (retried, bounded, with backoff),
-ENOMEM target full (ends the batch). The kernel reports every page, even
after a failed migration; a call-level error fails the chunk and the mover
goes on.

The kernel does not report where a moved page went, so its heat cannot
follow it: the idle scan finds it again at its new PFN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from tierd.collectors.collector import Setup
from tierd.config import Config
from tierd.errors import Unusable
from tierd.kernel import move_phys
from tierd.movers.batches import BatchResult, MoverParams, move_groups
from tierd.movers.mover import MaplessMover, mover_params
from tierd.vocabulary import PAGE_SHIFT, Batch, Health, State

# (physical addresses, target nodes, statuses to fill, flags) -> the call's result (how many
# pages got an error status); raises OSError for the call (move_phys_pages_into's signature).
MovePhysPages = Callable[[npt.NDArray[np.uint64], npt.NDArray[np.int32],
                          npt.NDArray[np.int32], int], int]


# Shared pages too, unless the config says no: the kernel refuses a target outside
# the cpuset or MPOL_BIND nodes of any process mapping the page (-EPERM).
SHARED_DEFAULT = True


class PhysMover(MaplessMover):
    name = "phys"

    def __init__(self, move_phys_pages: MovePhysPages, params: MoverParams | None = None
                 ) -> None:
        self._move = move_phys_pages
        self.params = params or MoverParams()

    def move(self, batch: Batch, flags: npt.NDArray[np.uint64] | None = None) -> BatchResult:
        """Move the batch. `flags` (its PFNs' kpageflags, which the PID mover uses to group
        folios) is not needed: the kernel resolves each PFN's folio itself."""
        result = BatchResult()
        pfns = batch.pfns
        addrs = pfns << np.uint64(PAGE_SHIFT)
        nodes = np.full(min(addrs.size, self.params.batch_pages), batch.target, dtype=np.int32)

        def send(pages: slice | npt.NDArray[np.intp], statuses: npt.NDArray[np.int32]) -> int:
            sent = addrs[pages]
            return self._move(sent, nodes[:sent.size], statuses,
                              self.params.flags(shared_default=SHARED_DEFAULT))

        every_page = np.ones(pfns.size, dtype=np.bool_)  # each PFN its own entry
        moved = move_groups(send, pfns, every_page, batch.target, result, self.params)
        result.succeed(pfns if moved.all() else pfns[moved])
        return result



def open_mover(config: Config, setup: Setup) -> PhysMover:
    """move_phys_pages, only when its probe proved this kernel implements it."""
    support = move_phys.probe(setup.root)
    if not support.usable:
        raise Unusable(Health(State.DISABLED, f"move_phys_pages is unusable: {support.reason}"))
    return PhysMover(move_phys.move_phys_pages_into, mover_params(config))
