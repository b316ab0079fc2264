"""The daemon process's allocator: keep freed memory for the next interval's arrays.

Every interval tierd allocates PFN-scale temporaries (bitmap and flag
chunks, reverse-map arrays, batch arrays) of about the same sizes as the
interval before. glibc hands large blocks back to the kernel when they are
freed (blocks above the mmap threshold are munmapped; a free top of the
heap above the trim threshold is trimmed), so the next interval faults the
same amount of fresh memory in again: a zeroed page per 4 KiB. On hardware
that is a few percent of a numpy pass over the same bytes; under emulation
(the TCG lab) a fresh page costs about 13 us, more than the pass.

keep_freed_memory() raises both thresholds once at start-up: blocks up to
glibc's largest mmap threshold come from the heap, and up to `retain_bytes`
of freed heap stays mapped for reuse. The daemon's resident size then
stays near its peak instead of swinging with each interval. Arrays larger
than the mmap threshold (only on hosts with very large reverse maps) are
mmapped as before, where their fault cost is small beside their own work.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD_MAX = 32 << 20
DEFAULT_RETAIN_BYTES = 256 << 20


def keep_freed_memory(retain_bytes: int = DEFAULT_RETAIN_BYTES) -> bool:
    """Set glibc's mmap and trim thresholds for reuse; False where that is not possible
    (not glibc, or glibc refused), which costs only speed."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt (not glibc): the allocator keeps its defaults")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
                and mallopt(M_TRIM_THRESHOLD, retain_bytes))
    if not done:
        log.debug("mallopt refused the thresholds: the allocator keeps its defaults")
    return done
