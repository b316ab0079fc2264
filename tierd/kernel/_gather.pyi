# Types of the C extension tierd/kernel/_gather.c (see its docstrings).
import numpy as np
import numpy.typing as npt

def gather(fd: int, keys: npt.NDArray[np.uint64], shift: int, out: npt.NDArray[np.uint64],
           fill: int, max_gap: int, mask: int) -> bool: ...
