"""tierd: a system-wide memory-tiering daemon for hosts with CXL or other slow memory."""

__version__ = "0.1.0"
