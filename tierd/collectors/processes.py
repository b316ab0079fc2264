"""Which processes tierd leaves alone: excluded by pid, command name or cgroup, and itself.

Collectors that monitor processes (DAMON's vaddr mode) and the movers' reverse
map share one filter, so an excluded process is neither watched nor moved.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from tierd.kernel import task
from tierd.kernel.root import HOST, HostRoot


@dataclass(frozen=True)
class Exclusions:
    pids: tuple[int, ...] = ()
    comms: tuple[str, ...] = ()  # fnmatch patterns on /proc/PID/comm
    cgroups: tuple[str, ...] = ()  # cgroup v2 paths; descendants are excluded too


def _in_cgroup(path: str, excluded: str) -> bool:
    excluded = excluded.rstrip("/") or "/"
    return excluded == "/" or path == excluded or path.startswith(excluded + "/")


class ProcessFilter:
    """Which processes tierd may touch."""

    def __init__(self, exclusions: Exclusions, root: HostRoot = HOST,
                 self_pid: int | None = None) -> None:
        self.exclusions = exclusions
        self.root = root
        self.self_pid = os.getpid() if self_pid is None else self_pid

    def excluded(self, pid: int) -> str | None:
        """Why `pid` is excluded ("self", "pid", "comm", "cgroup"), or None.

        Raises ProcessGoneError when the process exited meanwhile.
        """
        if pid == self.self_pid:
            return "self"
        if pid in self.exclusions.pids:
            return "pid"
        if self.exclusions.comms:
            name = task.comm(pid, self.root)
            if any(fnmatch.fnmatchcase(name, p) for p in self.exclusions.comms):
                return "comm"
        if self.exclusions.cgroups:
            path = task.cgroup(pid, self.root)
            if any(_in_cgroup(path, c) for c in self.exclusions.cgroups):
                return "cgroup"
        return None
