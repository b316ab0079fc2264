"""Kernel interfaces: one small module per procfs/sysfs file family, syscall or perf.

Every reader takes a `HostRoot`, so unit tests point it at a fixture tree and
production at `/`.
"""
