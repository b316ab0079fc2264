"""move_phys_pages: move pages named by physical address, whoever maps them.

The syscall comes from tierd's kernel patch series
(packaging/kernel/patches, docs/move_phys_pages.md); no mainline kernel has
it, so it has no fixed number. A kernel with the series says which number it
uses in /sys/kernel/mm/move_phys_pages/syscall_nr; without that file tierd
never calls it. The RFC's numbers, 454 and 462, are futex_wake and mseal in
mainline, which is why a number is never guessed, and why one that mainline
or x32 uses is refused even when the file names it.

probe() is this module's entry in tierd.probe (a Capability that also carries
the number). move_phys_pages() works like tierd.kernel.numa.move_pages:
physical addresses are a uint64 array, nodes an int32 array, the per-page
status comes back as an int32 array, one syscall per MAX_PAGES entries; it
calls the number probe() proved unless given one.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError
from tierd.kernel.numa import MPOL_MF_MOVE, check_lengths
from tierd.kernel.root import HOST, HostRoot
from tierd.vocabulary import Capability

NAME = "move_phys_pages"
SYSCALL_NR_FILE = "/sys/kernel/mm/move_phys_pages/syscall_nr"
# x86_64 numbers mainline has handed out (through 6.18) and the x32 range:
# a kernel naming one of these for move_phys_pages is not to be believed.
MAINLINE_LAST_NR = 469
X32_RANGE = range(512, 548)
# Entries one call may carry (the kernel's cap; more is E2BIG): longer arrays are split.
MAX_PAGES = 65536

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MovePhysPagesError(OSError):
    """The whole move_phys_pages call failed (EPERM, EINVAL, ENODEV, EFAULT, ...)."""


@dataclass(frozen=True)
class MovePhysPagesSupport(Capability):
    """Whether this kernel has move_phys_pages, its number, and if not, why not."""

    number: int | None = None

    @property
    def available(self) -> bool:
        return self.usable

    def as_dict(self) -> dict[str, object]:
        """The fields every probe reports; the number is in `reason` already."""
        return Capability(self.name, self.usable, self.reason).as_dict()

    def __str__(self) -> str:
        if self.available:
            return f"{NAME}: available (syscall {self.number})"
        return f"{NAME}: unavailable ({self.reason})"


def _unavailable(reason: str) -> MovePhysPagesSupport:
    return MovePhysPagesSupport(NAME, False, reason)


def refusal(number: int) -> str | None:
    """Why `number` must not be called as move_phys_pages, or None if it may."""
    if number <= MAINLINE_LAST_NR:
        return f"syscall {number} belongs to mainline (<= {MAINLINE_LAST_NR})"
    if number in X32_RANGE:
        return f"syscall {number} is in the x32 range"
    return None


def probe(root: HostRoot = HOST) -> MovePhysPagesSupport:
    """Read the running kernel's proof that it implements move_phys_pages."""
    try:
        text = root.read_text(SYSCALL_NR_FILE)
    except KernelFileError as e:
        if e.reason == "missing":
            return _unavailable(f"{SYSCALL_NR_FILE} missing: kernel without the tierd series")
        return _unavailable(str(e))
    value = text.strip()
    if not (value.isascii() and value.isdigit()):
        return _unavailable(str(KernelFileError(root(SYSCALL_NR_FILE),
                                                f"not a syscall number: {value!r}")))
    number = int(value)
    refused = refusal(number)
    if refused:
        return _unavailable(str(KernelFileError(root(SYSCALL_NR_FILE), refused)))
    return MovePhysPagesSupport(NAME, True, f"syscall {number}", number)


@functools.cache
def proven_number() -> int:
    """The running kernel's move_phys_pages number; MovePhysPagesError(ENOSYS) if unproven."""
    support = probe(HOST)
    if support.number is None:
        raise MovePhysPagesError(errno.ENOSYS, str(support))
    return support.number


def _ptr(array: npt.NDArray[Any] | None) -> ctypes.c_void_p | None:
    return None if array is None else ctypes.c_void_p(array.ctypes.data)


def move_phys_pages(
    phys_addrs: npt.ArrayLike,
    nodes: npt.ArrayLike | None = None,
    flags: int = MPOL_MF_MOVE,
    *,
    nr: int | None = None,
) -> npt.NDArray[np.int32]:
    """Move (or with nodes=None, query) the pages at physical addresses `phys_addrs`.

    `nr` is the syscall number, by default the one the running kernel proves
    in sysfs (proven_number()). Returns the per-page status: the node the page
    is on after the call (with nodes=None: where it is, if it could move), or
    a negative errno: -ENOENT not user memory (offline, free, kernel,
    unmapped); -EFAULT zero page or unmigratable mapping; -EACCES shared
    without MPOL_MF_MOVE_ALL; -EPERM target outside a mapping task's cpuset or
    a mapping's MPOL_BIND policy; -EBUSY busy for now (isolated, locked,
    pinned, failed to migrate); -ENOMEM target full. Every address of a large
    folio, and an address given twice, reports the folio's one status.
    Raises MovePhysPagesError when the call as a whole fails (ENOSYS when the
    kernel proves no number), ValueError for a number that must not be called.
    """
    addrs = np.ascontiguousarray(phys_addrs, dtype=np.uint64)
    node_array = None if nodes is None else np.ascontiguousarray(nodes, dtype=np.int32)
    status = np.empty(addrs.shape, dtype=np.int32)
    move_phys_pages_into(addrs, node_array, status, flags, nr=nr)
    return status


def move_phys_pages_into(phys_addrs: npt.NDArray[np.uint64], nodes: npt.NDArray[np.int32] | None,
                         status: npt.NDArray[np.int32], flags: int = MPOL_MF_MOVE, *,
                         nr: int | None = None) -> int:
    """move_phys_pages() into a caller's status array: the phys mover's per-call path.

    All three arrays must be contiguous, of these dtypes and one length.
    Returns how many pages got an error status (0: every page reached its
    node), over one call per MAX_PAGES entries; a failed call raises, its
    pages' statuses unset.
    """
    if nr is None:
        nr = proven_number()
    refused = refusal(nr)
    if refused:
        raise ValueError(f"refusing to call {refused}")
    check_lengths(phys_addrs, nodes, status)
    failed = 0
    for start in range(0, phys_addrs.size, MAX_PAGES):
        end = min(start + MAX_PAGES, phys_addrs.size)
        failed += _call(nr, phys_addrs[start:end], None if nodes is None else nodes[start:end],
                        status[start:end], flags)
    return failed


def _call(nr: int, phys_addrs: npt.NDArray[np.uint64], nodes: npt.NDArray[np.int32] | None,
          status: npt.NDArray[np.int32], flags: int) -> int:
    rc: int = _libc.syscall(
        ctypes.c_long(nr), ctypes.c_ulong(phys_addrs.size),
        _ptr(phys_addrs), _ptr(nodes), _ptr(status), ctypes.c_int(flags),
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise MovePhysPagesError(
            err, f"move_phys_pages({phys_addrs.size} pages): {os.strerror(err)}")
    return int(rc)
