"""Safety rules both movers obey: excluded processes and cgroups, pinned pages, kernel tiering.

- Excluded processes (by pid, by command-name pattern, by cgroup v2 path,
  which covers the cgroup's descendants) are never in the reverse map, and
  their cgroups' pages are filtered out by /proc/kpagecgroup before a move
  by physical address; tierd never moves its own pages either.
- Mlocked, unevictable, poisoned and reserved pages are dropped from every
  batch by /proc/kpageflags before any syscall; pages in a process's mlocked
  mappings too, by its smaps and pagemap, since a large folio mapped by PTEs
  loses its PG_mlocked.
- The kernel's own tiering (NUMA balancing in tiering mode, demotion on
  reclaim) competes with tierd for the same pages: the configured stance is
  to coexist, warn, or refuse to start.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tierd.collectors.processes import Exclusions, ProcessFilter
from tierd.errors import HostMismatch, KernelFileError, TierdError
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


@dataclass(frozen=True)
class Protected:
    """Frames no mover may touch beyond what kpageflags says, each array sorted, and the
    errors met reading them (what each one left protected)."""

    excluded: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    locked: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    errors: tuple[str, ...] = ()


def protected_pfns(process_filter: ProcessFilter, root: HostRoot = HOST) -> Protected:
    """PFNs mapped by excluded processes (tierd's own pages are not protected), and PFNs
    in any process's mlocked mappings.

    Reads only the excluded processes' pagemaps, and the smaps and locked ranges of
    processes whose status counts locked memory, so it stays cheap; a process that
    exits meanwhile simply contributes nothing.
    """
    excluded, locked = [np.zeros(0, dtype=np.uint64)], [np.zeros(0, dtype=np.uint64)]
    errors: list[str] = []
    for pid in task.pids(root):
        try:
            if process_filter.excluded(pid) not in (None, "self"):
                excluded.append(_mapped_pfns(pid, None, root))
            elif task.locked_kib(pid, root):
                locked.append(_locked_pfns(pid, root, errors))
        except pagemap.ProcessGoneError:
            continue
    return Protected(np.unique(np.concatenate(excluded)), np.unique(np.concatenate(locked)),
                     tuple(errors))


def _locked_pfns(pid: int, root: HostRoot, errors: list[str]) -> npt.NDArray[np.uint64]:
    """The PFNs of `pid`'s mlocked mappings; all its PFNs when its smaps cannot say which,
    and none (kpageflags alone protects them) when its memory cannot be read at all."""
    try:
        ranges = pagemap.locked_ranges(pid, root)
    except pagemap.ProcessGoneError:
        raise
    except KernelFileError as e:
        errors.append(f"{e}; protecting every page of pid {pid}")
        ranges = None
    try:
        return _mapped_pfns(pid, ranges, root)
    except pagemap.ProcessGoneError:
        raise
    except KernelFileError as e:
        errors.append(f"{e}; only kpageflags protects the locked pages of pid {pid}")
        return np.zeros(0, dtype=np.uint64)


def _mapped_pfns(pid: int, ranges: list[tuple[int, int]] | None, root: HostRoot
                 ) -> npt.NDArray[np.uint64]:
    """The PFNs `pid` maps in the vaddr `ranges` (None: in all its scannable mappings)."""
    if ranges is None:
        ranges = [(m.start, m.end) for m in pagemap.scannable(pagemap.read_maps(pid, root))]
    pfns = pagemap.pfn_of(pagemap.read_ranges(pid, ranges, root))
    mapped: npt.NDArray[np.uint64] = pfns[pfns != 0]
    return mapped


def drop_pinned(pfns: npt.NDArray[np.uint64], root: HostRoot = HOST,
                memcg_inodes: frozenset[int] = frozenset(),
                protected: Protected | None = None,
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
    if protected is not None:
        for frames, reason in ((protected.excluded, "excluded_process"),
                               (protected.locked, "mlocked")):
            if frames.size:
                owned = np.isin(pfns, frames)
                reasons[owned & (reasons == None)] = reason  # noqa: E711 (elementwise)
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
