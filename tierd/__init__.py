"""tierd: a system-wide memory-tiering daemon for hosts with CXL or other slow memory."""

import os

# Before any module imports numpy: OpenBLAS's thread pool would start with every
# capability and keep them after `tierd run` drops its own; tierd does no BLAS work.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
