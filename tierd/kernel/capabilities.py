"""Capabilities: what tierd keeps after start-up, and none for the HTTP threads.

Capabilities are per thread. After start-up (collectors open, the metrics
port bound) the main thread keeps only what the loop still uses and drops
the rest from its effective, permitted and inheritable sets and from the
bounding set; threads started afterwards inherit that. The metrics thread
then drops every capability for itself and the connection threads it
starts: the HTTP parser runs with none.

Kept, and why:
    CAP_SYS_ADMIN        /proc/kpageflags, PFNs in /proc/PID/pagemap, move_phys_pages, DAMON
    CAP_SYS_NICE         move_pages(2) of other users' processes, MPOL_MF_MOVE_ALL
    CAP_SYS_PTRACE       /proc/PID/pagemap and /proc/PID/maps of other processes
    CAP_DAC_READ_SEARCH  /proc/PID files of other users
    CAP_DAC_OVERRIDE     sysfs and procfs files written as root (page_idle, DAMON)
    CAP_PERFMON, CAP_BPF perf_event_open per CPU, bcc programs
    CAP_IPC_LOCK         perf ring buffers beyond the mlock limit
    CAP_SYS_RESOURCE     the same rings past perf_event_mlock_kb
"""

from __future__ import annotations

import ctypes
import os

_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_SETPCAP = 8
CAP_IPC_LOCK = 14
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_SYS_NICE = 23
CAP_SYS_RESOURCE = 24
CAP_PERFMON = 38
CAP_BPF = 39

KEPT = frozenset({CAP_SYS_ADMIN, CAP_SYS_NICE, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH,
                  CAP_DAC_OVERRIDE, CAP_PERFMON, CAP_BPF, CAP_IPC_LOCK, CAP_SYS_RESOURCE})


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _get() -> tuple[_Header, ctypes.Array[_Data]]:
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    return header, data


def _set(header: _Header, data: ctypes.Array[_Data]) -> None:
    if _libc.capset(ctypes.byref(header), data) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def effective() -> int:
    """The calling thread's effective set as a bit mask."""
    _, data = _get()
    return int(data[0].effective) | int(data[1].effective) << 32


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def keep_only(kept: frozenset[int] = KEPT) -> None:
    """Drop every capability not in `kept` from the bounding set and this thread's sets."""
    header, data = _get()
    if data[0].effective >> CAP_SETPCAP & 1:  # dropping from the bounding set needs it
        _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        for cap in range(_last_cap() + 1):
            if cap not in kept:
                _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    mask = sum(1 << cap for cap in kept)
    for word in (0, 1):
        bits = mask >> (32 * word) & 0xFFFFFFFF
        data[word].effective &= bits
        data[word].permitted &= bits
        data[word].inheritable = 0
    _set(header, data)


def drop_all() -> None:
    """This thread (and threads it starts) keeps no capability."""
    keep_only(frozenset())
