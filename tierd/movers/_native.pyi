# Types of the C extension tierd/movers/_native.c (see its docstrings).
import numpy as np
import numpy.typing as npt

# Arrays of 8-byte integers, signed or not.
_Int8 = npt.NDArray[np.uint64] | npt.NDArray[np.int64]

def extent_find(start: npt.NDArray[np.uint64], length: npt.NDArray[np.uint32],
                owner: npt.NDArray[np.uint64], block_pfns: int, pfns: npt.NDArray[np.uint64],
                index: npt.NDArray[np.int64], owners: npt.NDArray[np.uint64]) -> int: ...
def extent_holders(start: npt.NDArray[np.uint64], length: npt.NDArray[np.uint32],
                   block_pfns: int, pfns: npt.NDArray[np.uint64], which: npt.NDArray[np.int64],
                   index: npt.NDArray[np.int64]) -> int: ...
def extent_pieces(start: npt.NDArray[np.uint64], length: npt.NDArray[np.uint32],
                  owner: npt.NDArray[np.uint64], touched: npt.NDArray[np.int64],
                  pfns: npt.NDArray[np.uint64], out_start: npt.NDArray[np.uint64],
                  out_length: npt.NDArray[np.uint32], out_owner: npt.NDArray[np.uint64]) -> int: ...
def page_extents(pfns: npt.NDArray[np.uint64], owners: npt.NDArray[np.uint64], block_pfns: int,
                 start: npt.NDArray[np.uint64], owner: npt.NDArray[np.uint64],
                 length: npt.NDArray[np.uint32]) -> int: ...
def pagemap_extents(entries: npt.NDArray[np.uint64], bounds: npt.NDArray[np.uint64], base: int,
                    block_pfns: int, start: npt.NDArray[np.uint64],
                    owner: npt.NDArray[np.uint64], length: npt.NDArray[np.uint32]) -> int: ...
def sort_pairs(keys: npt.NDArray[np.uint64], values: _Int8) -> None: ...
def ascends(a: npt.NDArray[np.uint64], strictly: bool) -> bool: ...
def folio_starts(pfns: npt.NDArray[np.uint64], flags: npt.NDArray[np.uint64], tail_mask: int,
                 vaddrs: npt.NDArray[np.uint64] | None, page_size: int,
                 out: npt.NDArray[np.bool_]) -> int: ...
