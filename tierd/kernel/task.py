"""Per-process facts the movers need: /proc/PID/{exe,comm,cgroup,status,statm}.

A process can exit between any two reads; every reader raises
ProcessGoneError (from tierd.kernel.pagemap) for that, KernelFileError for
anything else, so callers can tell "gone" (normal) from "broken" (a problem).
"""

from __future__ import annotations

import os

from tierd.errors import KernelFileError
from tierd.kernel.nodes import parse_cpulist
from tierd.kernel.pagemap import read_proc_file
from tierd.kernel.root import HOST, HostRoot


def _read(pid: int, name: str, root: HostRoot) -> str:
    return os.fsdecode(read_proc_file(root.fspath(f"/proc/{pid}/{name}")))


def pids(root: HostRoot = HOST) -> list[int]:
    """Every process id under /proc, ascending."""
    proc = root.fspath("/proc")
    try:
        names = os.listdir(proc)
    except OSError as e:
        raise KernelFileError(proc, e.strerror or str(e)) from None
    return sorted(int(n) for n in names if n.isdigit())


def has_address_space(pid: int, root: HostRoot = HOST) -> bool:
    """Whether the process has user memory: /proc/PID/exe resolves only while it has one.

    Kernel threads, zombies and processes gone answer ENOENT: one readlink,
    where reading their empty maps takes an open, a read and a close. Any
    other error (no permission) says nothing, and the caller's own read of
    the process reports it.
    """
    try:
        os.readlink(root.fspath(f"/proc/{pid}/exe"))
    except FileNotFoundError:
        return False
    except OSError:  # no permission: says nothing either way
        pass
    return True


def comm(pid: int, root: HostRoot = HOST) -> str:
    return _read(pid, "comm", root).rstrip("\n")


def cgroup(pid: int, root: HostRoot = HOST) -> str:
    """The process's cgroup v2 path ("/system.slice/x.service"), "" without a v2 entry."""
    for line in _read(pid, "cgroup", root).splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            return path
    return ""


def resident_pages(pid: int, root: HostRoot = HOST) -> int:
    """Resident pages (statm's second field)."""
    text = _read(pid, "statm", root)
    try:
        return int(text.split()[1])
    except (IndexError, ValueError):
        raise KernelFileError(root(f"/proc/{pid}/statm"), f"malformed: {text!r}",
                              key="resident") from None


def _status_value(pid: int, key: str, root: HostRoot) -> str | None:
    """The value of status's `key` line, stripped; None without that line."""
    for line in _read(pid, "status", root).splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return value.strip()
    return None


def mems_allowed(pid: int, root: HostRoot = HOST) -> frozenset[int]:
    """The nodes the process's cpuset allows (status's Mems_allowed_list)."""
    path = root(f"/proc/{pid}/status")
    value = _status_value(pid, "Mems_allowed_list", root)
    if value is None:
        raise KernelFileError(path, "no Mems_allowed_list line", key="Mems_allowed_list")
    return frozenset(parse_cpulist(value, f"{path}: Mems_allowed_list"))


def locked_kib(pid: int, root: HostRoot = HOST) -> int:
    """KiB of the process's mlocked mappings (status's VmLck; 0 without the line, as for a
    kernel thread)."""
    value = _status_value(pid, "VmLck", root)
    if value is None:
        return 0
    size, _, unit = value.partition(" ")
    if not size.isdigit() or unit != "kB":
        raise KernelFileError(root(f"/proc/{pid}/status"), f"malformed: {value!r}",
                              key="VmLck")
    return int(size)
