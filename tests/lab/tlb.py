"""Drop the calling process's TLB entries, for lab tests that watch Accessed bits.

page_idle and DAMON learn that a page was used from its PTE's Accessed bit,
which they clear without a TLB flush (x86 ptep_clear_flush_young: "it will
eventually be flushed by a context switch"). The CPU sets the bit again only
when it walks the page table, i.e. once the page's TLB entry is gone. On
hardware that takes microseconds: a few thousand entries, a context switch
now and then. QEMU's TCG keeps a software TLB that grows with use and is
flushed only when the guest asks, so after earlier tests have grown it, a
process can touch a 64 MiB buffer for minutes, or right after a mark, and
never set an Accessed bit again: its pages look idle to page_idle and cold
to DAMON. A lab test that touches pages and then checks what the kernel saw
must drop its TLB entries first, as hardware would have.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE = mmap.PAGESIZE
# More PTEs than x86's tlb_single_page_flush_ceiling (33): changing them in
# one call makes flush_tlb_mm_range flush the whole TLB, not 64 entries.
SCRATCH_PAGES = 64

_libc = ctypes.CDLL(None, use_errno=True)
_scratch: np.ndarray | None = None


def _mprotect(view: np.ndarray, prot: int) -> None:
    if _libc.mprotect(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(view.size), prot):
        raise OSError(ctypes.get_errno(), "mprotect")


def drop_tlb() -> None:
    """Flush every TLB entry of this process (on every CPU it ran on)."""
    global _scratch
    if _scratch is None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        _scratch = np.frombuffer(mmap.mmap(-1, SCRATCH_PAGES * PAGE, flags=flags), np.uint8)
        _scratch[::PAGE] = 1  # present PTEs, or mprotect has nothing to change and flush
    _mprotect(_scratch, mmap.PROT_READ)
    _mprotect(_scratch, mmap.PROT_READ | mmap.PROT_WRITE)
