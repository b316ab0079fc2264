"""/sys/kernel/mm/page_idle/bitmap: mark pages idle, read back which stayed idle.

The bitmap is an array of native-endian u64 words; bit i % 64 of word i // 64
is PFN i. Reads and writes must be 8-byte aligned and a multiple of 8 long,
and sysfs hands at most one page (4 KiB = 32768 PFNs) to the kernel per
call, so both directions loop over short transfers into the caller's numpy
buffer. Writing a 1 marks a page idle (the kernel first clears its young
bits through an rmap walk, the main cost); reading returns 1 for pages not
accessed since. Only user pages on the LRU take part, and of a large folio
only the head. Reads past the last PFN return EOF, writes fail with ENXIO.
The last PFN (max_pfn) need not end a word, and a transfer never counts a
partial word: the PFNs of the last word are out of reach (the lab's 2304 MiB
guest ends 32 PFNs into a word).
"""

from __future__ import annotations

import errno
import os

import numpy as np
import numpy.typing as npt

from tierd.kernel.kernel_fd import NEEDS_ROOT, KernelFd
from tierd.kernel.root import HOST, HostRoot

BITMAP = "/sys/kernel/mm/page_idle/bitmap"
PFNS_PER_WORD = 64
WORD_BYTES = 8

MISSING_REASON = "missing (kernel built without CONFIG_IDLE_PAGE_TRACKING)"


def words_for(pfn_start: int, pfn_end: int) -> tuple[int, int]:
    """[first, last) bitmap words covering PFNs [pfn_start, pfn_end)."""
    return pfn_start // PFNS_PER_WORD, -(-pfn_end // PFNS_PER_WORD)


def edge_masks(pfn_start: int, pfn_end: int) -> tuple[np.uint64, np.uint64]:
    """Masks of the first and last word keeping only bits of PFNs in the range."""
    first = np.uint64((~0 << (pfn_start % PFNS_PER_WORD)) & (2**64 - 1))
    tail = pfn_end % PFNS_PER_WORD
    last = np.uint64((1 << tail) - 1 if tail else 2**64 - 1)
    return first, last


def unpack(words: npt.NDArray[np.uint64], skip: int, count: int) -> npt.NDArray[np.bool_]:
    """Bits [skip, skip + count) of `words` as a bool array (bit i of word j = j*64 + i)."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return bits[skip:skip + count].view(np.bool_)


class IdleBitmap(KernelFd):
    """The open bitmap file; one instance per collector."""

    def __init__(self, root: HostRoot = HOST) -> None:
        super().__init__(root(BITMAP), os.O_RDWR, missing=MISSING_REASON)

    def check(self) -> str | None:
        """Why the bitmap cannot be used (missing, not writable), or None. Changes nothing."""
        if not self.path.exists():
            return f"{self.path}: {MISSING_REASON}"
        if not os.access(self.path, os.R_OK | os.W_OK):
            return f"{self.path}: {NEEDS_ROOT}"
        return None

    def read_words(self, first_word: int, out: npt.NDArray[np.uint64]) -> int:
        """Read words [first_word, first_word + out.size) into `out`.

        Returns how many words the kernel had; words past its last PFN are
        zeroed (not idle). Raises KernelFileError naming the failing offset.
        """
        done = self._pread_into(out.view(np.uint8).data, first_word * WORD_BYTES)
        out[done // WORD_BYTES:] = 0
        return done // WORD_BYTES

    def write_words(self, first_word: int, words: npt.NDArray[np.uint64]) -> int:
        """Write `words` at `first_word` (1 bits mark PFNs idle).

        Returns how many words the kernel took: fewer than given when the
        range runs past its last PFN (ENXIO). Other errors raise
        KernelFileError naming the offset.
        """
        fd = self._open()
        view = words.view(np.uint8).data
        done = 0
        while done < view.nbytes:
            offset = first_word * WORD_BYTES + done
            try:
                n = os.pwrite(fd, view[done:], offset)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise self._error(e, offset) from None
            if n == 0:
                break
            done += n
        return done // WORD_BYTES
