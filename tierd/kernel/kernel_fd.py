"""One open kernel file (procfs, sysfs) kept for repeated positioned reads and writes.

Per-PFN files are read in many ranges per scan, so their readers keep one fd
instead of reopening the file each time. Every error names the file (and the
offset, for reads), since the same code reads several kernel files.
gather_in_any_order() serves every per-page file read at a batch's indices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError

NEEDS_ROOT = "permission denied (needs root)"


class KernelFd:
    """Owns the fd of `path`, opened with `flags` on first use; close() or `with` releases it."""

    def __init__(self, path: Path, flags: int, missing: str = "missing") -> None:
        self.path = path
        self._flags = flags
        self._missing = missing  # what a missing file means, for the error message
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, self._flags | os.O_CLOEXEC)
            except FileNotFoundError:
                raise KernelFileError(self.path, self._missing) from None
            except PermissionError:
                raise KernelFileError(self.path, NEEDS_ROOT) from None
            except OSError as e:
                raise KernelFileError(self.path, e.strerror or str(e)) from None
        return self._fd

    def _error(self, e: OSError, offset: int) -> KernelFileError:
        return KernelFileError(self.path, e.strerror or str(e), key=f"offset {offset:#x}")

    def _pread_into(self, view: memoryview, offset: int) -> int:
        """Read into `view` from `offset` until it is full or the file ends; bytes read.

        procfs and sysfs hand over at most a page per call, hence the loop.
        """
        fd = self._open()
        done = 0
        while done < view.nbytes:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise self._error(e, offset + done) from None
            if n == 0:
                break
            done += n
        return done

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# Fills its second argument with the entries at the ascending keys given first and
# returns True, or returns False, having read nothing, when they do not ascend
# (tierd.kernel._gather.gather bound to one file).
GatherAscending = Callable[[npt.NDArray[np.uint64], npt.NDArray[np.uint64]], bool]


def gather_in_any_order(keys: npt.ArrayLike, gather: GatherAscending) -> npt.NDArray[np.uint64]:
    """The entries at `keys` (any order, repeats allowed) of a per-page file.

    Keys that ascend, as a batch's do, are read in one C pass; any others
    are read sorted and handed back in their own order.
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    out = np.empty(keys.size, dtype=np.uint64)
    if gather(keys, out):
        return out
    order = np.argsort(keys)
    gather(keys[order], out)
    unsorted = np.empty_like(out)
    unsorted[order] = out
    return unsorted
