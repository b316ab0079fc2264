"""Group a batch's PFNs by folio, so each large folio (a THP) goes to the kernel once.

Given any PFN of a large folio, migration moves the whole folio; the folio's
other PFNs, when they follow in the same call, find it isolated (-ENOENT from
move_phys_pages, -EBUSY from move_pages) and, once it moved, free. So a mover
sends one PFN per folio, cuts its calls only between folios, and gives every
PFN of a folio the status of the one it sent.

A PFN belongs to the folio of the PFN before it when it directly follows it
and /proc/kpageflags marks it a compound tail (tails always follow their head
physically). Flags are a snapshot: a folio split after the read has only its
sent page moved, and the idle scan finds the rest where they are.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tierd.kernel import kpageflags as kpf
from tierd.kernel.root import HOST, HostRoot
from tierd.movers import _native
from tierd.vocabulary import PAGE_SIZE


def group_starts(pfns: npt.NDArray[np.uint64], flags: npt.NDArray[np.uint64],
                 vaddrs: npt.NDArray[np.uint64] | None = None) -> npt.NDArray[np.bool_]:
    """Per page: does it start a folio group, rather than continue the page before it?

    `vaddrs`, when given (the PID mover: one process's pages), further
    requires the page to be mapped at the virtual page after the previous one.
    One pass in C (tierd/movers/_native.c), where numpy took eight.
    """
    first = np.empty(pfns.size, dtype=np.bool_)
    _native.folio_starts(np.ascontiguousarray(pfns), np.ascontiguousarray(flags),
                         int(kpf.mask(kpf.KPF_COMPOUND_TAIL)),
                         None if vaddrs is None else np.ascontiguousarray(vaddrs), PAGE_SIZE,
                         first)
    return first


def read_group_starts(pfns: npt.NDArray[np.uint64], root: HostRoot = HOST
                      ) -> npt.NDArray[np.bool_]:
    """group_starts() of the sorted `pfns`, their flags read from /proc/kpageflags."""
    if pfns.size == 0:
        return np.zeros(0, dtype=np.bool_)
    with kpf.kpageflags(root) as flags_file:
        return group_starts(pfns, flags_file.read_at(pfns))


def chunk_bounds(first: npt.NDArray[np.bool_], step: int) -> list[int]:
    """[0, ..., n]: chunks of at most `step` pages, cut only where a group starts.

    A group larger than `step` goes alone. Chunks stay bounded in memory
    moved, not in PFNs sent, so `batch_pages` means the same with or
    without large folios.
    """
    if first.all():  # no large folio: every page starts a group
        return [*range(0, first.size, step), first.size]
    starts = np.flatnonzero(first)
    bounds = [0]
    while bounds[-1] < first.size:
        at = bounds[-1]
        if at + step >= first.size:
            bounds.append(first.size)
            continue
        cut = int(starts[np.searchsorted(starts, at + step, side="right") - 1])
        if cut == at:  # one group larger than step
            after = np.searchsorted(starts, at, side="right")
            cut = int(starts[after]) if after < starts.size else first.size
        bounds.append(cut)
    return bounds
