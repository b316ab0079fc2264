"""Safety rules both movers obey: excluded processes and cgroups, pinned pages, kernel tiering.

- Excluded processes (by pid, by command-name pattern, by cgroup v2 path,
  which covers the cgroup's descendants) are never in the reverse map, and
  their cgroups' pages are filtered out by /proc/kpagecgroup before a move
  by physical address; tierd never moves its own pages either.
- Mlocked, unevictable, poisoned and reserved pages are dropped from every
  batch by /proc/kpageflags before any syscall.
- The kernel's own tiering (NUMA balancing in tiering mode, demotion on
  reclaim) competes with tierd for the same pages: the configured stance is
  to coexist, warn, or refuse to start.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np
import numpy.typing as npt

from tierd.collectors.processes import Exclusions, ProcessFilter
from tierd.errors import HostMismatch, TierdError
from tierd.kernel import kpageflags as kpf
from tierd.kernel import pagemap, task
from tierd.kernel.kernel_tiering import KernelTiering
from tierd.kernel.root import HOST, HostRoot

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
STANCES = ("coexist", "warn", "refuse")


def excluded_memcg_inodes(exclusions: Exclusions, root: HostRoot = HOST) -> frozenset[int]:
    """Inode numbers of the excluded cgroups and all their descendants (kpagecgroup's ids)."""
    inodes: set[int] = set()
    for cgroup in exclusions.cgroups:
        top = root(CGROUP_ROOT + "/" + cgroup.strip("/"))
        if not top.is_dir():
            log.warning("excluded cgroup %s does not exist (yet); nothing to exclude there", cgroup)
            continue
        for dirpath, _, _ in os.walk(top):
            inodes.add(os.stat(dirpath).st_ino)
    return frozenset(inodes)


def pinned_reasons(flags: npt.NDArray[np.uint64]) -> npt.NDArray[np.object_]:
    """Per PFN: why it must not move ("mlocked", "unevictable", ...) or None."""
    reasons = np.full(flags.shape, None, dtype=object)
    for bit, name in ((kpf.KPF_NOPAGE, "no_page"), (kpf.KPF_RESERVED, "reserved"),
                      (kpf.KPF_HWPOISON, "hwpoison"), (kpf.KPF_UNEVICTABLE, "unevictable"),
                      (kpf.KPF_MLOCKED, "mlocked")):
        reasons[kpf.has_any(flags, bit)] = name  # the last (most specific) reason wins
    return reasons


def excluded_process_pfns(process_filter: ProcessFilter, root: HostRoot = HOST
                          ) -> npt.NDArray[np.uint64]:
    """Sorted PFNs mapped by excluded processes (tierd's own pages are not protected).

    Reads only the excluded processes' pagemaps, so it stays cheap; a process
    that exits meanwhile simply contributes nothing.
    """
    parts = [np.zeros(0, dtype=np.uint64)]
    for pid in task.pids(root):
        try:
            if process_filter.excluded(pid) in (None, "self"):
                continue
            maps = pagemap.scannable(pagemap.read_maps(pid, root))
            entries = pagemap.read_ranges(pid, [(m.start, m.end) for m in maps], root)
        except pagemap.ProcessGoneError:
            continue
        pfns = pagemap.pfn_of(entries)
        parts.append(pfns[pfns != 0])
    return np.unique(np.concatenate(parts))


def drop_pinned(pfns: npt.NDArray[np.uint64], root: HostRoot = HOST,
                memcg_inodes: frozenset[int] = frozenset(),
                excluded_pfns: npt.NDArray[np.uint64] | None = None,
                ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64], Counter[str]]:
    """The sorted `pfns` minus pinned pages and pages of excluded processes and cgroups,
    their kpageflags (a mover's folio grouping needs them: one read per batch), and why
    each went."""
    if pfns.size == 0:
        return pfns, np.zeros(0, dtype=np.uint64), Counter()
    with kpf.kpageflags(root) as flags_file:
        flags = flags_file.read_at(pfns)
    reasons = pinned_reasons(flags)
    if memcg_inodes:
        with kpf.kpagecgroup(root) as cgroup_file:
            owners = cgroup_file.read_at(pfns)
        excluded = np.isin(owners, np.fromiter(memcg_inodes, dtype=np.uint64))
        reasons[excluded & (reasons == None)] = "excluded_cgroup"  # noqa: E711 (elementwise)
    if excluded_pfns is not None and excluded_pfns.size:
        owned = np.isin(pfns, excluded_pfns, assume_unique=False)
        reasons[owned & (reasons == None)] = "excluded_process"  # noqa: E711 (elementwise)
    keep = reasons == None  # noqa: E711 (elementwise comparison)
    dropped = Counter(reasons[~keep].tolist())
    return pfns[keep], flags[keep], dropped


def check_kernel_tiering(tiering: KernelTiering, stance: str) -> str:
    """Apply the configured stance; returns a one-word summary for the state.

    Raises TierdError when the stance is "refuse" and the kernel tiers pages itself.
    """
    if stance not in STANCES:
        raise TierdError(f"kernel_tiering: unknown stance {stance!r} (one of {STANCES})")
    if not tiering.active:
        return "off"
    what = tiering.describe()
    if stance == "refuse":
        raise HostMismatch(f"the kernel tiers memory itself ({what}); kernel_tiering is "
                         "'refuse': turn it off or set kernel_tiering: coexist")
    if stance == "warn":
        log.warning("the kernel tiers memory itself (%s): tierd and the kernel may move "
                    "the same pages back and forth", what)
    else:
        log.info("coexisting with the kernel's own tiering (%s)", what)
    return "on"
