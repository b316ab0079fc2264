"""DAMON's sysfs interface (/sys/kernel/mm/damon/admin/), as in Linux 6.12's usage.rst.

tierd runs either one kdamond with one `paddr` context over physical address
ranges, or one kdamond per monitored process with a `vaddr` context (its
regions are virtual addresses of that process: sysfs lists a scheme's regions
without their target, so one target per kdamond). Each context has a single
DAMOS scheme with the `stat` action matching
every region, so that writing `update_schemes_tried_regions` to the kdamond's
`state` makes the kernel list every monitored region with its `nr_accesses`
and `age` under `schemes/0/tried_regions/` (the kernel clears the old list
itself; the write returns once the list is complete).

Writing `kdamonds/nr_kdamonds` recreates every kdamond directory, and the
kernel refuses it (EBUSY) while any kdamond runs: tierd never takes over a
running kdamond that someone else started (DamonBusyError).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from tierd.errors import KernelFileError
from tierd.kernel.root import HOST, HostRoot

log = logging.getLogger(__name__)

ADMIN = "/sys/kernel/mm/damon/admin"
KDAMONDS = f"{ADMIN}/kdamonds"
MAX_UL = (1 << 64) - 1  # "no upper bound" for access-pattern ranges
MAX_UINT = (1 << 32) - 1
# DAMON's sysfs files take one global lock with mutex_trylock and fail with
# EBUSY while anyone else (a `damo` reader, a kdamond copying regions) holds it.
CONTENDED_WAIT = 2.0  # seconds to keep retrying such an EBUSY

_T = TypeVar("_T")


class DamonError(KernelFileError):
    """A DAMON sysfs file is missing, refused a value, or DAMON is unusable."""


class DamonBusyError(DamonError):
    """Another DAMON user runs a kdamond; tierd will not disturb it."""


@dataclass(frozen=True)
class MonitoringAttrs:
    """DAMON's intervals (microseconds) and region-count bounds."""

    sample_us: int = 5_000
    aggr_us: int = 100_000
    update_us: int = 1_000_000
    min_nr_regions: int = 10
    max_nr_regions: int = 1000

    @property
    def max_nr_accesses(self) -> int:
        """The most a region's nr_accesses can be: samples per aggregation interval."""
        return self.aggr_us // self.sample_us


@dataclass(frozen=True)
class Regions:
    """Monitored regions: physical byte ranges [start, end) with their access counts."""

    start: npt.NDArray[np.uint64]
    end: npt.NDArray[np.uint64]
    nr_accesses: npt.NDArray[np.uint32]
    age: npt.NDArray[np.uint32]


def _uncontended(call: Callable[[], _T]) -> _T:
    """`call()`, retried while the DAMON sysfs lock is held elsewhere (EBUSY)."""
    deadline = time.monotonic() + CONTENDED_WAIT
    pause = 0.005
    while True:
        try:
            return call()
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _write(root: HostRoot, path: str, value: str | int, secret: bool = False) -> None:
    """One write(2) per value, as sysfs expects; errors name the file and the value,
    unless `secret` (an address: errors reach the status page)."""
    full = root(path)
    shown = "the value" if secret else repr(value)
    key = None if secret else str(value)
    try:
        fd = os.open(full, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC: harmless on sysfs
    except OSError as e:
        raise _error(full, e) from None
    try:
        _uncontended(lambda: os.write(fd, str(value).encode()))
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DamonBusyError(full, "busy (a kdamond is running)", key=key) from None
        raise DamonError(full, f"kernel refused {shown}: {e.strerror}", key=key) from None
    finally:
        os.close(fd)


def _error(path: Path, e: OSError) -> DamonError:
    if isinstance(e, FileNotFoundError):
        return DamonError(path, "missing")
    if isinstance(e, PermissionError):
        return DamonError(path, "permission denied (needs root)")
    return DamonError(path, e.strerror or str(e))


def _read(root: HostRoot, path: str) -> str:
    full = root(path)
    try:
        return _uncontended(full.read_text).strip()
    except OSError as e:
        raise _error(full, e) from None


def _read_int(root: HostRoot, path: str) -> int:
    text = _read(root, path)
    try:
        return int(text)
    except ValueError:
        raise DamonError(root(path), f"not a number: {text!r}") from None


def availability(root: HostRoot = HOST) -> str | None:
    """None when tierd can run a paddr kdamond here, else why not (without changing anything)."""
    if not root(ADMIN).is_dir():
        return f"{root(ADMIN)} is missing (kernel without CONFIG_DAMON_SYSFS)"
    try:
        running = running_kdamonds(root)
    except DamonError as e:
        return str(e)
    if running:
        return f"busy: kdamond {', '.join(map(str, running))} already running (another DAMON user)"
    if not os.access(root(f"{KDAMONDS}/nr_kdamonds"), os.W_OK):
        return f"{root(f'{KDAMONDS}/nr_kdamonds')}: permission denied (needs root)"
    return None


def running_kdamonds(root: HostRoot = HOST) -> list[int]:
    """Indexes of the kdamonds whose state is `on`."""
    count = _read_int(root, f"{KDAMONDS}/nr_kdamonds")
    return [i for i in range(count) if _read(root, f"{KDAMONDS}/{i}/state") == "on"]


class Kdamond:
    """tierd's kdamond (index 0 after setup): configure, start, query, stop."""

    def __init__(self, root: HostRoot = HOST, index: int = 0) -> None:
        self.root = root
        self.base = f"{KDAMONDS}/{index}"
        self.ctx = f"{self.base}/contexts/0"
        self.scheme = f"{self.ctx}/schemes/0"

    def setup_paddr(self, ranges: list[tuple[int, int]], attrs: MonitoringAttrs) -> None:
        """Lay out one paddr context over the physical byte `ranges` with a stat scheme."""
        running = running_kdamonds(self.root)
        if running:
            raise DamonBusyError(self.root(f"{KDAMONDS}/{running[0]}/state"),
                                 "already running (another DAMON user)")
        _write(self.root, f"{KDAMONDS}/nr_kdamonds", 1)
        self._use_operations("paddr", "CONFIG_DAMON_PADDR")
        self._write_attrs(attrs)
        self._write_regions(ranges)
        self._write_stat_scheme()

    def setup_vaddr(self, pid: int, attrs: MonitoringAttrs) -> None:
        """Lay out one vaddr context over process `pid` with a stat scheme.

        The kdamond's directory must exist (create_kdamonds); DAMON picks the
        initial regions from the process's mappings itself.
        """
        self._use_operations("vaddr", "CONFIG_DAMON_VADDR")
        self._write_attrs(attrs)
        _write(self.root, f"{self.ctx}/targets/nr_targets", 1)
        _write(self.root, f"{self.ctx}/targets/0/pid_target", pid)
        self._write_stat_scheme()

    def _use_operations(self, operations: str, kconfig: str) -> None:
        """One context with `operations`; DamonError naming the file if the kernel lacks them."""
        _write(self.root, f"{self.base}/contexts/nr_contexts", 1)
        available = _read(self.root, f"{self.ctx}/avail_operations").split()
        if operations not in available:
            raise DamonError(self.root(f"{self.ctx}/avail_operations"),
                             f"no {operations} (kernel without {kconfig}): {available}")
        _write(self.root, f"{self.ctx}/operations", operations)

    def _write_attrs(self, attrs: MonitoringAttrs) -> None:
        mon = f"{self.ctx}/monitoring_attrs"
        _write(self.root, f"{mon}/intervals/sample_us", attrs.sample_us)
        _write(self.root, f"{mon}/intervals/aggr_us", attrs.aggr_us)
        _write(self.root, f"{mon}/intervals/update_us", attrs.update_us)
        _write(self.root, f"{mon}/nr_regions/min", attrs.min_nr_regions)
        _write(self.root, f"{mon}/nr_regions/max", attrs.max_nr_regions)

    def _write_regions(self, ranges: list[tuple[int, int]]) -> None:
        targets = f"{self.ctx}/targets"
        _write(self.root, f"{targets}/nr_targets", 1)
        _write(self.root, f"{targets}/0/regions/nr_regions", len(ranges))
        for i, (start, end) in enumerate(ranges):
            _write(self.root, f"{targets}/0/regions/{i}/start", start, secret=True)
            _write(self.root, f"{targets}/0/regions/{i}/end", end, secret=True)

    def _write_stat_scheme(self) -> None:
        _write(self.root, f"{self.ctx}/schemes/nr_schemes", 1)
        _write(self.root, f"{self.scheme}/action", "stat")
        pattern = f"{self.scheme}/access_pattern"
        for name, upper in (("sz", MAX_UL), ("nr_accesses", MAX_UINT), ("age", MAX_UINT)):
            _write(self.root, f"{pattern}/{name}/min", 0)
            _write(self.root, f"{pattern}/{name}/max", upper)

    def state(self) -> str:
        return _read(self.root, f"{self.base}/state")

    def start(self) -> None:
        _write(self.root, f"{self.base}/state", "on")

    def stop(self) -> None:
        """Turn the kdamond off if it runs (idempotent)."""
        if self.root(f"{self.base}/state").exists() and self.state() == "on":
            _write(self.root, f"{self.base}/state", "off")

    def regions(self, attempts: int = 3) -> Regions:
        """Every monitored region with nr_accesses and age as of the next aggregation.

        The kernel gives up on a snapshot after two apply intervals of wall
        time (damos_sysfs_mark_finished_regions_updates) and then lists no
        region at all; a kdamond slowed down by a busy host hits that, so an
        empty snapshot is retried before it counts as a failure.
        """
        for _ in range(attempts):
            _write(self.root, f"{self.base}/state", "update_schemes_tried_regions")
            regions = self.read_tried_regions()
            if regions.start.size:
                return regions
        raise DamonError(self.root(f"{self.scheme}/tried_regions"),
                         f"no region listed after {attempts} snapshots (kdamond too slow?)")

    def read_tried_regions(self) -> Regions:
        tried = f"{self.scheme}/tried_regions"
        directory = self.root(tried)
        try:
            indexes = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        except OSError as e:
            raise DamonError(directory, e.strerror or str(e)) from None
        values = np.zeros((4, len(indexes)), dtype=np.uint64)
        for column, i in enumerate(indexes):
            values[:, column] = [
                _read_int(self.root, f"{tried}/{i}/{name}")
                for name in ("start", "end", "nr_accesses", "age")
            ]
        order = np.argsort(values[0], kind="stable")
        values = values[:, order]
        return Regions(values[0], values[1], values[2].astype(np.uint32),
                       values[3].astype(np.uint32))

    def release(self) -> None:
        """Stop and drop tierd's kdamond directories, leaving DAMON as tierd found it."""
        self.stop()
        if self.root(f"{KDAMONDS}/nr_kdamonds").exists():
            _write(self.root, f"{KDAMONDS}/nr_kdamonds", 0)


def create_kdamonds(count: int, root: HostRoot = HOST) -> list[Kdamond]:
    """`count` fresh kdamond directories (refused while someone's kdamond runs)."""
    running = running_kdamonds(root)
    if running:
        raise DamonBusyError(root(f"{KDAMONDS}/{running[0]}/state"),
                             "already running (another DAMON user)")
    _write(root, f"{KDAMONDS}/nr_kdamonds", count)
    return [Kdamond(root, i) for i in range(count)]


def pid_of(root: HostRoot = HOST, index: int = 0) -> int | None:
    """The running kdamond thread's pid, None when it is off."""
    text = _read(root, f"{KDAMONDS}/{index}/pid")
    pid = int(text) if text.lstrip("-").isdigit() else -1
    return pid if pid > 0 else None


# --- kdamonds a killed tierd left running ---------------------------------------------
#
# DAMON's sysfs has no owner field, so tierd notes the kthread pid of every
# kdamond it turns on in LEDGER (under /run: kdamonds do not outlive a boot,
# nor does the note). A restarted tierd stops the running kdamonds whose pid
# is noted there, and only those: another DAMON user's are left alone.

LEDGER = "/run/tierd/kdamonds"


def note_started(root: HostRoot = HOST) -> None:
    """Note the pids of the kdamonds running now (all tierd's: it starts only when none runs)."""
    pids = [pid for i in running_kdamonds(root) if (pid := pid_of(root, i)) is not None]
    path = root(LEDGER)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text("".join(f"{pid}\n" for pid in pids))
        os.replace(temporary, path)
    except OSError as e:
        log.warning("DAMON: cannot note tierd's kdamonds in %s (a crash would leave them"
                    " running): %s", path, e.strerror or e)


def forget_started(root: HostRoot = HOST) -> None:
    """tierd's kdamonds are stopped: nothing to reclaim."""
    with contextlib.suppress(FileNotFoundError):
        root(LEDGER).unlink()


def reclaim(root: HostRoot = HOST) -> int:
    """Stop the kdamonds a previous tierd noted and left running; how many were stopped."""
    try:
        noted = {int(w) for w in root(LEDGER).read_text().split() if w.isdigit()}
    except (OSError, ValueError):
        return 0
    if not root(ADMIN).is_dir():
        return 0
    running = running_kdamonds(root)
    ours = [i for i in running if pid_of(root, i) in noted]
    for i in ours:
        Kdamond(root, i).stop()
    if ours and len(ours) == len(running):
        _write(root, f"{KDAMONDS}/nr_kdamonds", 0)  # as tierd's release() would have
    forget_started(root)
    if ours:
        log.warning("DAMON: stopped %d kdamond(s) a previous tierd left running", len(ours))
    return len(ours)
