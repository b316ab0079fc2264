"""move_pages(2): move a process's pages between NUMA nodes, or query where they are.

Arrays in, arrays out: addresses are a uint64 array, nodes an int32 array and
the per-page status comes back as an int32 array (a node number, or a
negative errno), so a batch of a million pages costs one syscall and no
Python loop.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

import numpy as np
import numpy.typing as npt

SYS_MOVE_PAGES = 279  # x86_64
MPOL_MF_MOVE = 1 << 1
MPOL_MF_MOVE_ALL = 1 << 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class MovePagesError(OSError):
    """The whole move_pages call failed (ESRCH, EPERM, EACCES, ENODEV, ...)."""


def _ptr(array: npt.NDArray[Any] | None) -> ctypes.c_void_p | None:
    return None if array is None else ctypes.c_void_p(array.ctypes.data)


def check_lengths(addrs: npt.NDArray[Any], nodes: npt.NDArray[Any] | None,
                  status: npt.NDArray[Any]) -> None:
    """ValueError unless the nodes (when given) and statuses match the addresses one to one."""
    if nodes is not None and nodes.shape != addrs.shape:
        raise ValueError(f"{addrs.size} addresses but {nodes.size} nodes")
    if status.shape != addrs.shape:
        raise ValueError(f"{addrs.size} addresses but {status.size} statuses")


def move_pages(
    pid: int,
    addresses: npt.ArrayLike,
    nodes: npt.ArrayLike | None = None,
    flags: int = MPOL_MF_MOVE,
) -> npt.NDArray[np.int32]:
    """Move (or with nodes=None, query) the pages at `addresses` of `pid`.

    Returns the per-page status: the node the page is on after the call, or
    a negative errno (-ENOENT not present, -EACCES shared or not allowed,
    -EBUSY, -EFAULT, -ENOMEM, ...). Raises MovePagesError when the call as a
    whole fails.
    """
    addrs = np.ascontiguousarray(addresses, dtype=np.uint64)
    node_array = None if nodes is None else np.ascontiguousarray(nodes, dtype=np.int32)
    status = np.empty(addrs.shape, dtype=np.int32)
    move_pages_into(pid, addrs, node_array, status, flags)
    return status


def move_pages_into(pid: int, addrs: npt.NDArray[np.uint64],
                    nodes: npt.NDArray[np.int32] | None, status: npt.NDArray[np.int32],
                    flags: int = MPOL_MF_MOVE) -> int:
    """move_pages() into a caller's status array: the movers' per-call path.

    All three arrays must be contiguous, of these dtypes and one length.
    Pages the kernel never reached read -EINVAL. Returns the call's result:
    0, or how many pages the kernel failed to migrate (it stops at the first
    failed migration, and then some statuses are not set). Raises
    MovePagesError when the call as a whole fails.
    """
    check_lengths(addrs, nodes, status)
    status.fill(-errno.EINVAL)
    if addrs.size == 0:
        return 0
    rc: int = _libc.syscall(
        ctypes.c_long(SYS_MOVE_PAGES), ctypes.c_long(pid), ctypes.c_ulong(addrs.size),
        _ptr(addrs), _ptr(nodes), _ptr(status), ctypes.c_int(flags),
    )
    if rc < 0:
        err = ctypes.get_errno()
        raise MovePagesError(err, f"move_pages(pid {pid}, {addrs.size} pages): {os.strerror(err)}")
    return rc
