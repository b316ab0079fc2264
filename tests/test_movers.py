"""Movers and their safety rules: per-page statuses, call errors, pinned and excluded pages."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from tierd.collectors.collector import Pace
from tierd.collectors.processes import Exclusions, ProcessFilter
from tierd.collectors.topology import Topology
from tierd.config import Config
from tierd.daemon import Daemon
from tierd.errors import KernelFileError, TierdError
from tierd.heat import HeatModel
from tierd.kernel import kpageflags as kpf
from tierd.kernel import numa, pagemap, task
from tierd.kernel.kernel_tiering import KernelTiering, read_kernel_tiering
from tierd.kernel.root import HostRoot
from tierd.movers import folios, safety
from tierd.movers.batches import MoverParams, count_reasons
from tierd.movers.dry_run import WouldMoveLedger
from tierd.movers.folios import chunk_bounds
from tierd.movers.mover import Mover
from tierd.movers.phys import PhysMover
from tierd.movers.pid import PidMover
from tierd.movers.rmap import ReverseMap
from tierd.pipeline import Pipeline
from tierd.policy import Plan
from tierd.vocabulary import PAGE_SIZE, Batch, Direction

FIXTURES = Path(__file__).parent / "fixtures" / "movers"
ROOT = HostRoot(FIXTURES)
PAGE = PAGE_SIZE


def _answer(statuses: list[int], nodes: np.ndarray, out: np.ndarray) -> int:
    """Write a fake call's statuses into `out`; the call's result: pages not moved."""
    out[:] = statuses
    return int((out != nodes).sum())


class FakeKernel:
    """move_pages_into with scripted per-page statuses (by vaddr page), recording each call."""

    def __init__(self, statuses: dict[int, list[int]] | None = None,
                 call_error: int | None = None) -> None:
        self.statuses = statuses or {}  # vaddr page -> statuses of successive calls
        self.call_error = call_error
        self.calls: list[tuple[int, list[int], list[int], int]] = []

    def __call__(self, pid: int, addrs: np.ndarray, nodes: np.ndarray, status: np.ndarray,
                 flags: int) -> int:
        self.calls.append((pid, (addrs // PAGE).tolist(), nodes.tolist(), flags))
        if self.call_error is not None:
            raise numa.MovePagesError(self.call_error, os.strerror(self.call_error))
        if not set(nodes.tolist()) <= _mems_allowed(pid):  # as do_pages_move checks
            raise numa.MovePagesError(errno.EACCES, os.strerror(errno.EACCES))
        out = []
        for page, node in zip((addrs // PAGE).tolist(), nodes.tolist(), strict=True):
            script = self.statuses.get(page, [])
            out.append(script.pop(0) if script else node)
        return _answer(out, nodes, status)


def _mems_allowed(pid: int) -> set[int]:
    """The fixture process's cpuset nodes ("0" or "0-1" in the fixtures)."""
    status = (FIXTURES / f"proc/{pid}/status").read_text()
    value = status.split("Mems_allowed_list:")[1].split()[0]
    first, _, last = value.partition("-")
    return set(range(int(first), int(last or first) + 1))


def _mover(kernel: FakeKernel, exclusions: Exclusions | None = None, **params: object
           ) -> tuple[PidMover, ReverseMap]:
    rmap = ReverseMap(ProcessFilter(exclusions or Exclusions(), ROOT, self_pid=1), ROOT)
    rmap.refresh()
    mover = PidMover(rmap, MoverParams(busy_backoff=0, **params), ROOT, move_pages=kernel)
    return mover, rmap


def _batch(pfns: list[int], target: int = 1) -> Batch:
    return Batch(Direction.DEMOTE, 0, target, np.array(pfns, dtype=np.uint64))


def test_pages_are_grouped_by_process_and_chunked_to_one_target() -> None:
    kernel = FakeKernel()
    mover, _ = _mover(kernel, batch_pages=2)
    result = mover.move(_batch([16, 17, 18, 40, 41]))
    assert [(pid, pages, nodes) for pid, pages, nodes, _ in kernel.calls] == [
        (4242, [16, 17], [1, 1]), (4242, [18], [1]), (4243, [16, 17], [1, 1])]
    assert all(flags == numa.MPOL_MF_MOVE_ALL for *_, flags in kernel.calls)
    assert sorted(result.moved.tolist()) == [16, 17, 18, 40, 41]
    assert not result.failures


def test_a_page_joins_the_group_before_only_as_the_next_pfn_tail_and_page() -> None:
    tail = int(kpf.mask(kpf.KPF_COMPOUND_TAIL))
    pfns = np.array([8, 9, 10, 20, 21], dtype=np.uint64)
    flags = np.array([0, tail, tail, tail, 0], dtype=np.uint64)
    vaddrs = np.array([0, 1, 5, 6, 7], dtype=np.uint64) * np.uint64(PAGE)
    assert folios.group_starts(pfns, flags).tolist() == [True, False, False, True, True]
    # By address too (the PID mover): PFN 10 is mapped elsewhere, so it starts a group.
    assert folios.group_starts(pfns, flags, vaddrs).tolist() == [True, False, True, True, True]
    with pytest.raises(ValueError, match="must match pfns in size"):
        folios.group_starts(pfns, flags[:3])


def test_chunks_are_cut_only_between_folios_with_or_without_large_ones() -> None:
    assert chunk_bounds(np.ones(5, dtype=np.bool_), 2) == [0, 2, 4, 5]
    assert chunk_bounds(np.ones(0, dtype=np.bool_), 2) == [0]
    # Groups of 1, 3 (a folio) and 1 pages: a chunk never splits the folio,
    # and the folio larger than a chunk goes alone.
    assert chunk_bounds(np.array([1, 1, 0, 0, 1], dtype=np.bool_), 2) == [0, 1, 4, 5]


def test_every_per_page_status_is_counted_by_reason() -> None:
    kernel = FakeKernel({16: [-errno.ENOENT], 17: [-errno.EACCES], 18: [-errno.EPERM],
                         19: [-errno.EFAULT], 22: [-errno.EIO], 23: [-errno.EINVAL]})
    mover, rmap = _mover(kernel)
    result = mover.move(_batch([16, 17, 18, 19, 32, 48, 99]))
    assert result.failures == {"ENOENT": 1, "EACCES": 1, "EPERM": 1, "EFAULT": 1, "EIO": 1,
                               "EINVAL": 1, "not_in_rmap": 1}
    assert result.moved.size == 0 and sorted(result.not_moved.tolist()) == [16, 17, 18, 19, 32,
                                                                            48, 99]
    # Vanished, not migratable any more, or not in the map: the location is stale.
    assert sorted(result.stale.tolist()) == [16, 19, 99]
    assert 16 not in rmap.pfn.tolist()


def test_busy_pages_are_retried_a_bounded_number_of_times() -> None:
    kernel = FakeKernel({16: [-errno.EBUSY, 1], 17: [-errno.EBUSY] * 10})
    mover, _ = _mover(kernel, busy_retries=2)
    result = mover.move(_batch([16, 17]))
    assert result.moved.tolist() == [16]
    assert result.failures == {"EBUSY": 1}
    assert [pages for _, pages, _, _ in kernel.calls] == [[16, 17], [16, 17], [17]]


def test_busy_pages_of_every_chunk_go_again_together_after_one_backoff(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("tierd.movers.batches.time.sleep", sleeps.append)
    kernel = FakeKernel({16: [-errno.EBUSY], 18: [-errno.EBUSY]})
    mover, _ = _mover(kernel, batch_pages=2)
    mover.params = MoverParams(batch_pages=2, busy_backoff=0.25)
    result = mover.move(_batch([16, 17, 18, 19]))
    assert [pages for _, pages, _, _ in kernel.calls] == [[16, 17], [18, 19], [16, 18]]
    assert sleeps == [0.25]
    assert sorted(result.moved.tolist()) == [16, 17, 18, 19] and not result.failures


def test_a_gone_process_stops_its_calls() -> None:
    kernel = FakeKernel(call_error=errno.ESRCH)
    mover, _ = _mover(kernel, batch_pages=2)
    result = mover.move(_batch([16, 17, 18, 19]))
    assert len(kernel.calls) == 1
    assert result.failures == {"process_gone": 4}
    assert sorted(result.stale.tolist()) == [16, 17, 18, 19]


def test_enomem_stops_the_batch_for_that_target() -> None:
    kernel = FakeKernel({17: [-errno.ENOMEM]})
    mover, _ = _mover(kernel, batch_pages=2)
    result = mover.move(_batch([16, 17, 18, 19, 40]))
    assert result.target_full
    assert result.moved.tolist() == [16]
    assert result.failures == {"ENOMEM": 1, "target_full": 3}
    assert len(kernel.calls) == 1


@pytest.mark.parametrize(("err", "reason"), [(errno.ESRCH, "process_gone"),
                                             (errno.EPERM, "call_EPERM"),
                                             (errno.EACCES, "node_not_allowed"),
                                             (errno.ENODEV, "call_ENODEV")])
def test_call_level_errors_fail_the_pages_and_the_mover_goes_on(err: int, reason: str) -> None:
    mover, _ = _mover(FakeKernel(call_error=err))
    result = mover.move(_batch([16, 17, 40]))
    assert result.failures == {reason: 3}
    assert result.moved.size == 0


@pytest.mark.parametrize(("break_pagemap", "reason"), [
    (lambda path: path.unlink(), "process_gone"),  # exited since the map's refresh
    (lambda path: (path.unlink(), path.mkdir()), "proc_unreadable"),  # a read fails
])
def test_a_process_whose_pagemap_cannot_be_read_keeps_its_pages_and_the_batch_goes_on(
        tmp_path: Path, break_pagemap: Callable[[Path], object], reason: str) -> None:
    shutil.copytree(FIXTURES, tmp_path, symlinks=True, dirs_exist_ok=True)
    root = HostRoot(tmp_path)
    rmap = ReverseMap(ProcessFilter(Exclusions(), root, self_pid=1), root)
    rmap.refresh()
    break_pagemap(tmp_path / "proc/4243/pagemap")
    kernel = FakeKernel()
    mover = PidMover(rmap, MoverParams(busy_backoff=0), root, move_pages=kernel)
    result = mover.move(_batch([16, 17, 40, 41]))
    assert result.failures == {reason: 2}
    assert sorted(result.moved.tolist()) == [16, 17]
    assert [pid for pid, *_ in kernel.calls] == [4242]


def test_a_call_level_enomem_means_the_target_is_full() -> None:
    mover, _ = _mover(FakeKernel(call_error=errno.ENOMEM), batch_pages=2)
    result = mover.move(_batch([16, 17, 18, 40]))
    assert result.target_full
    assert result.failures == {"call_ENOMEM": 2, "target_full": 2}


def test_a_node_outside_mems_allowed_fails_that_process_and_the_batch_goes_on() -> None:
    kernel = FakeKernel()
    mover, _ = _mover(kernel)
    result = mover.move(_batch([44, 45, 16], target=1))
    assert result.failures == {"node_not_allowed": 2}
    assert result.moved.tolist() == [16]
    assert sorted(pid for pid, *_ in kernel.calls) == [4242, 4244]


def test_a_stale_reverse_map_entry_is_not_moved(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES, tmp_path, symlinks=True, dirs_exist_ok=True)
    root = HostRoot(tmp_path)
    rmap = ReverseMap(ProcessFilter(Exclusions(), root, self_pid=1), root)
    rmap.refresh()
    entries = np.fromfile(tmp_path / "proc/4242/pagemap", dtype=np.uint64)
    entries[16] = (1 << 63) | 63  # the page at vaddr page 16 now lives at PFN 63
    entries.tofile(tmp_path / "proc/4242/pagemap")
    kernel = FakeKernel()
    result = PidMover(rmap, MoverParams(busy_backoff=0), root, kernel).move(_batch([16, 17]))
    assert result.failures == {"stale_rmap": 1} and result.moved.tolist() == [17]
    assert kernel.calls[0][1] == [17]


def test_moved_pages_are_found_at_their_new_pfns(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES, tmp_path, symlinks=True, dirs_exist_ok=True)
    root = HostRoot(tmp_path)
    pagemap_file = tmp_path / "proc/4242/pagemap"
    rmap = ReverseMap(ProcessFilter(Exclusions(), root, self_pid=1), root)
    rmap.refresh()

    def migrate(pid: int, addrs: np.ndarray, nodes: np.ndarray, status: np.ndarray,
                flags: int) -> int:
        entries = np.fromfile(pagemap_file, dtype=np.uint64)
        entries[addrs // PAGE] = np.uint64(1 << 63) | (addrs // PAGE + np.uint64(1000))
        entries.tofile(pagemap_file)
        return _answer(nodes.tolist(), nodes, status)

    result = PidMover(rmap, MoverParams(busy_backoff=0), root, migrate).move(_batch([16, 17]))
    assert result.moved.tolist() == [16, 17] and result.new_pfns.tolist() == [1016, 1017]
    found, pids, vaddrs = rmap.lookup(np.array([16, 17, 1016, 1017], dtype=np.uint64))
    assert found.tolist() == [False, False, True, True]
    assert pids[2:].tolist() == [4242, 4242] and (vaddrs[2:] // PAGE).tolist() == [16, 17]


def test_excluded_processes_pages_are_not_in_the_map_so_never_moved() -> None:
    kernel = FakeKernel()
    mover, _ = _mover(kernel, exclusions=Exclusions(comms=("postgres*",)))
    result = mover.move(_batch([40, 41]))
    assert result.failures == {"not_in_rmap": 2} and not kernel.calls
    assert sorted(result.stale.tolist()) == [40, 41]


def test_pid_mover_sends_mpol_mf_move_all_unless_configured_not_to() -> None:
    """It checks every mapper's cpuset itself (below): auto (None) is yes."""
    for setting, flags in ((None, numa.MPOL_MF_MOVE_ALL), (False, numa.MPOL_MF_MOVE),
                           (True, numa.MPOL_MF_MOVE_ALL)):
        kernel = FakeKernel()
        mover, _ = _mover(kernel, move_all_shared=setting)
        result = mover.move(_batch([48]))
        assert kernel.calls[0][3] == flags, setting
        assert result.moved.tolist() == [48], setting


def _shared_root(tmp_path: Path, mapcount: int = 2, also_in: int | None = None) -> HostRoot:
    """The movers' fixture with PFN 48 (4242 and 4243 map it) counted `mapcount` times,
    and also mapped by process `also_in`, at its virtual page 18."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURES, root, symlinks=True)
    counts = np.fromfile(root / "proc/kpagecount", dtype=np.uint64)
    counts[48] = mapcount
    counts.tofile(root / "proc/kpagecount")
    if also_in is not None:
        entries = np.fromfile(root / f"proc/{also_in}/pagemap", dtype=np.uint64)
        entries[18] = np.uint64(1 << 63) | np.uint64(48)
        entries.tofile(root / f"proc/{also_in}/pagemap")
    return HostRoot(root)


def _shared_mover(root: HostRoot) -> tuple[PidMover, FakeKernel]:
    rmap = ReverseMap(ProcessFilter(Exclusions(), root, self_pid=1), root)
    rmap.refresh()
    kernel = FakeKernel()
    return PidMover(rmap, MoverParams(busy_backoff=0), root, move_pages=kernel), kernel


def test_a_shared_page_moves_only_where_every_mappers_cpuset_allows(tmp_path: Path) -> None:
    """move_pages checks only the called task's cpuset; 4244's allows node 0 alone."""
    mover, kernel = _shared_mover(_shared_root(tmp_path, mapcount=3, also_in=4244))
    result = mover.move(_batch([16, 48], target=1))
    assert result.failures == {"mapper_not_allowed": 1}
    assert result.moved.tolist() == [16] and result.not_moved.tolist() == [48]
    assert [pages for _, pages, *_ in kernel.calls] == [[16]]
    result = mover.move(_batch([48], target=0))  # every mapper allows node 0
    assert result.moved.tolist() == [48] and not result.failures


def test_pages_mapped_once_need_no_mapcount_read(tmp_path: Path) -> None:
    """The pagemap entry's PM_MMAP_EXCLUSIVE bit says so: private memory costs no read."""
    root = _shared_root(tmp_path)
    (tmp_path / "root/proc/kpagecount").unlink()
    mover, _ = _shared_mover(root)
    assert mover.move(_batch([16, 17, 40])).moved.tolist() == [16, 17, 40]
    with pytest.raises(TierdError, match="kpagecount"):
        mover.move(_batch([48]))


def test_a_shared_page_with_a_mapper_the_map_lacks_stays(tmp_path: Path) -> None:
    """kpagecount says three mappers, the map knows two: the third's cpuset is unknown."""
    mover, kernel = _shared_mover(_shared_root(tmp_path, mapcount=3))
    result = mover.move(_batch([48, 17]))
    assert result.failures == {"mapper_unknown": 1} and result.moved.tolist() == [17]
    assert [pages for _, pages, *_ in kernel.calls] == [[17]]
    assert not result.stale.size  # the page is still there: a cooldown, not forgotten


def test_mems_allowed_reads_the_node_list_and_names_a_bad_one(tmp_path: Path) -> None:
    assert task.mems_allowed(4244, ROOT) == {0} and task.mems_allowed(4242, ROOT) == {0, 1}
    (tmp_path / "proc/9").mkdir(parents=True)
    status = tmp_path / "proc/9/status"
    status.write_text("Name:\tx\nMems_allowed_list:\t0-1,x\n")
    with pytest.raises(TierdError, match=r"proc/9/status: Mems_allowed_list: bad list item"):
        task.mems_allowed(9, HostRoot(tmp_path))
    status.write_text("Name:\tx\n")
    with pytest.raises(TierdError, match=r"proc/9/status.*no Mems_allowed_list line"):
        task.mems_allowed(9, HostRoot(tmp_path))


def test_a_mapper_gone_before_its_cpuset_is_read_keeps_the_page(tmp_path: Path) -> None:
    root = _shared_root(tmp_path)
    mover, kernel = _shared_mover(root)
    (tmp_path / "root/proc/4243/status").unlink()
    result = mover.move(_batch([48]))
    assert result.failures == {"mapper_not_allowed": 1} and not kernel.calls


def test_phys_mover_sends_mpol_mf_move_all_unless_configured_not_to() -> None:
    """Its kernel checks every mapper's cpuset and MPOL_BIND: auto (None) is yes."""
    kernel = FakePhys()
    for setting in (None, False, True):
        PhysMover(kernel, MoverParams(move_all_shared=setting)).move(_batch([1]))
    assert kernel.flags == [numa.MPOL_MF_MOVE_ALL, numa.MPOL_MF_MOVE, numa.MPOL_MF_MOVE_ALL]


def test_move_all_shared_auto_leaves_it_to_the_mover() -> None:
    from tierd.config import parse
    from tierd.movers.mover import mover_params

    shipped = Path(__file__).resolve().parent.parent / "config" / "tierd.yaml"
    assert mover_params(parse(shipped.read_bytes())).move_all_shared is None
    assert mover_params(parse(b"{}")).move_all_shared is None
    for text, value in ((b"movers: {move_all_shared: true}", True),
                        (b"movers: {move_all_shared: false}", False)):
        assert mover_params(parse(text)).move_all_shared is value


def test_count_reasons_names_errnos_and_wrong_nodes() -> None:
    statuses = np.array([1, 0, -errno.EBUSY, -errno.EBUSY, -999], dtype=np.int32)
    assert count_reasons(statuses, target=1) == {"moved": 1, "stayed_on_node0": 1, "EBUSY": 2,
                                                 "errno999": 1}


# --- safety --------------------------------------------------------------------------------


def test_mlocked_and_unevictable_pages_are_dropped_before_any_move() -> None:
    pfns = np.array([16, 17, 18, 19, 80], dtype=np.uint64)
    keep, flags, dropped = safety.drop_pinned(pfns, ROOT)
    assert keep.tolist() == [16, 17]
    assert flags.tolist() == [1 << kpf.KPF_LRU] * 2  # the kept pages' flags, for the mover
    assert dropped == {"mlocked": 1, "unevictable": 1, "no_page": 1}


def test_pages_of_excluded_cgroups_are_dropped_by_kpagecgroup(tmp_path: Path) -> None:
    shutil.copytree(FIXTURES, tmp_path, symlinks=True, dirs_exist_ok=True)
    root = HostRoot(tmp_path)
    inodes = safety.excluded_memcg_inodes(Exclusions(cgroups=("/system.slice/db.service",)),
                                          root)
    sub = os.stat(tmp_path / "sys/fs/cgroup/system.slice/db.service/sub").st_ino
    assert sub in inodes and len(inodes) == 2
    owners = np.zeros(64, dtype=np.uint64)
    owners[[44, 45]] = sub
    owners.tofile(tmp_path / "proc/kpagecgroup")
    keep, _, dropped = safety.drop_pinned(np.array([16, 44, 45], dtype=np.uint64), root,
                                          inodes)
    assert keep.tolist() == [16] and dropped == {"excluded_cgroup": 2}


def test_process_filter_reasons() -> None:
    f = ProcessFilter(Exclusions(pids=(4242,), comms=("postgres*",),
                                 cgroups=("/system.slice/db.service/",)), ROOT, self_pid=2)
    assert [f.excluded(p) for p in (2, 4242, 4243, 4244)] == ["self", "pid", "comm", "cgroup"]
    assert ProcessFilter(Exclusions(cgroups=("/user",)), ROOT, 1).excluded(4242) is None


def test_kernel_tiering_is_read_and_the_stance_applied(tmp_path: Path) -> None:
    assert read_kernel_tiering(ROOT) == KernelTiering(0, False)
    assert safety.check_kernel_tiering(KernelTiering(0, False), "refuse") == "off"
    on = KernelTiering(2, True)
    assert on.describe() == "kernel.numa_balancing=2, demotion_enabled=true"
    assert safety.check_kernel_tiering(on, "coexist") == "on"
    assert safety.check_kernel_tiering(on, "warn") == "on"
    with pytest.raises(TierdError, match=r"numa_balancing=2.*refuse"):
        safety.check_kernel_tiering(on, "refuse")
    assert not KernelTiering(1, False).active  # classic NUMA balancing does not tier
    assert read_kernel_tiering(HostRoot(tmp_path)) == KernelTiering(None, None)


def test_pages_of_excluded_processes_are_dropped_for_any_mover() -> None:
    process_filter = ProcessFilter(Exclusions(comms=("postgres*",)), ROOT, self_pid=1)
    protected = safety.protected_pfns(process_filter, ROOT)
    assert protected.excluded.tolist() == [40, 41, 48]  # 48 is shared with 4242: protected too
    keep, _, dropped = safety.drop_pinned(np.array([16, 40, 48], dtype=np.uint64), ROOT,
                                          protected=protected)
    assert keep.tolist() == [16] and dropped == {"excluded_process": 2}




def _locking_root(tmp_path: Path) -> HostRoot:
    """The movers' fixture where 4242 reports locked memory: its smaps locks PFNs 16-19."""
    shutil.copytree(FIXTURES, tmp_path, symlinks=True, dirs_exist_ok=True)
    status = tmp_path / "proc/4242/status"
    status.write_text(status.read_text() + "VmLck:\t      16 kB\n")
    return HostRoot(tmp_path)


def test_pages_of_mlocked_mappings_are_dropped_though_kpageflags_shows_no_lock(
        tmp_path: Path) -> None:
    # A THP split by mprotect keeps its lock but loses PG_mlocked: the mapping says it.
    root = _locking_root(tmp_path)
    protected = safety.protected_pfns(ProcessFilter(Exclusions(), root, self_pid=1), root)
    assert protected.locked.tolist() == [16, 17, 18, 19] and not protected.errors
    keep, _, dropped = safety.drop_pinned(np.array([16, 17, 32], dtype=np.uint64),
                                          root, protected=protected)
    assert keep.tolist() == [32] and dropped == {"mlocked": 2}


@pytest.mark.parametrize("malformed", [True, False])
def test_an_unreadable_smaps_protects_the_whole_process_and_names_the_file(
        tmp_path: Path, malformed: bool) -> None:
    root = _locking_root(tmp_path)
    smaps = tmp_path / "proc/4242/smaps"
    if malformed:  # the last mapping lost its VmFlags line
        smaps.write_text(smaps.read_text().rsplit("VmFlags", 1)[0])
    else:  # unreadable: EISDIR
        smaps.unlink()
        smaps.mkdir()
    protected = safety.protected_pfns(ProcessFilter(Exclusions(), root, self_pid=1), root)
    assert protected.locked.tolist() == [16, 17, 18, 19, 32, 48]
    assert len(protected.errors) == 1 and "proc/4242/smaps" in protected.errors[0]
    assert "pid 4242" in protected.errors[0]


def test_a_locked_process_whose_memory_cannot_be_read_is_named_and_the_rest_goes_on(
        tmp_path: Path) -> None:
    root = _locking_root(tmp_path)
    for name in ("smaps", "maps"):  # unreadable, as another user's are without ptrace rights
        (tmp_path / "proc/4242" / name).unlink()
        (tmp_path / "proc/4242" / name).mkdir()
    protected = safety.protected_pfns(ProcessFilter(Exclusions(comms=("postgres*",)), root,
                                                    self_pid=1), root)
    assert protected.locked.size == 0 and protected.excluded.tolist() == [40, 41, 48]
    assert [e.split(": ")[0].endswith(f"proc/4242/{name}") for e, name in
            zip(protected.errors, ("smaps", "maps"), strict=True)] == [True, True]
    assert "only kpageflags protects the locked pages of pid 4242" in protected.errors[1]


def test_a_malformed_vmlck_names_the_file_and_key(tmp_path: Path) -> None:
    root = _locking_root(tmp_path)
    status = tmp_path / "proc/4242/status"
    status.write_text(status.read_text().replace("16 kB", "lots"))
    with pytest.raises(KernelFileError, match=r"proc/4242/status.*VmLck.*lots"):
        task.locked_kib(4242, root)


# --- the phys mover ------------------------------------------------------------------------


class FakePhys:
    """move_phys_pages_into with scripted per-PFN statuses."""

    def __init__(self, statuses: dict[int, list[int]] | None = None,
                 call_error: int | None = None) -> None:
        self.statuses = statuses or {}
        self.call_error = call_error
        self.calls: list[tuple[list[int], list[int]]] = []
        self.flags: list[int] = []

    def __call__(self, addrs: np.ndarray, nodes: np.ndarray, status: np.ndarray,
                 flags: int) -> int:
        self.calls.append(((addrs // PAGE).tolist(), nodes.tolist()))
        self.flags.append(flags)
        if self.call_error is not None:
            raise OSError(self.call_error, os.strerror(self.call_error))
        return _answer([(self.statuses.get(pfn) or [node]).pop(0)
                        for pfn, node in zip((addrs // PAGE).tolist(), nodes.tolist(),
                                             strict=True)], nodes, status)


def test_phys_mover_passes_physical_addresses_in_chunks_and_counts_statuses() -> None:
    kernel = FakePhys({3: [-errno.ENOENT], 4: [-errno.EBUSY, 1], 5: [-errno.EACCES]})
    mover = PhysMover(kernel, MoverParams(batch_pages=4, busy_backoff=0))
    result = mover.move(_batch([1, 2, 3, 4, 5, 6]))
    assert kernel.calls[0] == ([1, 2, 3, 4], [1, 1, 1, 1])
    assert sorted(result.moved.tolist()) == [1, 2, 4, 6]
    assert result.failures == {"ENOENT": 1, "EACCES": 1}
    assert (result.new_pfns == 0).all()  # the kernel does not say where pages went


def test_phys_mover_enomem_and_call_errors() -> None:
    mover = PhysMover(FakePhys({2: [-errno.ENOMEM]}), MoverParams(batch_pages=2))
    result = mover.move(_batch([1, 2, 3, 4]))
    assert result.target_full and result.failures == {"ENOMEM": 1, "target_full": 2}
    result = PhysMover(FakePhys(call_error=errno.EPERM)).move(_batch([1, 2]))
    assert result.failures == {"call_EPERM": 2} and result.moved.size == 0


# --- large folios --------------------------------------------------------------------------

HEAD = (1 << kpf.KPF_COMPOUND_HEAD) | (1 << kpf.KPF_THP) | (1 << kpf.KPF_LRU)
TAIL = (1 << kpf.KPF_COMPOUND_TAIL) | (1 << kpf.KPF_THP)


def _folio_root(tmp_path: Path, folios: list[tuple[int, int]], npfns: int = 64,
                mlocked: tuple[int, ...] = ()) -> HostRoot:
    """A fixture /proc/kpageflags: 4K LRU pages, with (head PFN, pages) large folios."""
    flags = np.full(npfns, 1 << kpf.KPF_LRU, dtype=np.uint64)
    for head, pages in folios:
        flags[head] = HEAD
        flags[head + 1:head + pages] = TAIL
    flags[list(mlocked)] |= np.uint64(1 << kpf.KPF_MLOCKED)
    (tmp_path / "proc").mkdir(exist_ok=True)
    flags.tofile(tmp_path / "proc/kpageflags")
    return HostRoot(tmp_path)


class FolioPhys:
    """move_phys_pages_into as the kernel does it: a PFN moves its whole folio, and every
    later PFN of a folio handled in the same call (or the same PFN again) gets that folio's
    status; in a later call a moved folio is on its target already. `outcomes` scripts a
    folio's failures, one per call that handles it."""

    def __init__(self, folios: list[tuple[int, int]],
                 outcomes: dict[int, list[int]] | None = None) -> None:
        self.folio_of = {pfn: head for head, pages in folios for pfn in range(head, head + pages)}
        self.outcomes = outcomes or {}
        self.node_of: dict[int, int] = {}  # folio head -> the node it moved to
        self.calls: list[list[int]] = []

    def __call__(self, addrs: np.ndarray, nodes: np.ndarray, status: np.ndarray,
                 flags: int) -> int:
        pfns = (addrs // PAGE).tolist()
        self.calls.append(pfns)
        handled: dict[int, int] = {}  # this call's folios and their statuses
        for pfn, node in zip(pfns, nodes.tolist(), strict=True):
            folio = self.folio_of.get(pfn, pfn)
            if folio not in handled:
                scripted = self.outcomes.get(folio)
                moved = self.node_of.get(folio) == node or not scripted
                handled[folio] = node if moved else scripted.pop(0)
                if moved:
                    self.node_of[folio] = node
        return _answer([handled[self.folio_of.get(p, p)] for p in pfns], nodes, status)


@pytest.mark.parametrize(("folios", "batch_pages", "calls"), [
    # one THP amid 4K pages: every PFN goes, the THP's too, in chunks of batch_pages
    ([(8, 8)], 64, [[*range(4, 18)]]),
    # a chunk may cut a THP: its PFNs in the next call find it on the target already
    ([(8, 8)], 8, [[*range(4, 12)], [*range(12, 18)]]),
    # 4K pages only
    ([], 4, [[4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17]]),
])
def test_phys_mover_sends_every_pfn_and_each_reports_its_folios_move(
        folios: list[tuple[int, int]], batch_pages: int, calls: list[list[int]]) -> None:
    pfns = [*range(4, 18)]
    kernel = FolioPhys(folios)
    result = PhysMover(kernel, MoverParams(batch_pages=batch_pages)).move(_batch(pfns))
    assert kernel.calls == calls
    assert sorted(result.moved.tolist()) == pfns
    assert not result.failures and result.not_moved.size == 0


def test_a_folio_status_is_counted_once_per_page_and_busy_folios_retry() -> None:
    kernel = FolioPhys([(8, 8), (16, 4)], {8: [-errno.EBUSY], 16: [-errno.EACCES] * 2})
    result = PhysMover(kernel, MoverParams(busy_backoff=0)).move(_batch([*range(8, 20)]))
    assert kernel.calls == [[*range(8, 20)], [*range(8, 16)]]  # only the busy THP again
    assert sorted(result.moved.tolist()) == [*range(8, 16)]
    assert result.failures == {"EACCES": 4}  # the 4 pages of the refused folio


def test_pid_mover_sends_one_address_per_folio_and_retries_a_busy_folio_whole(
        tmp_path: Path) -> None:
    shutil.copytree(FIXTURES, tmp_path, symlinks=True, dirs_exist_ok=True)
    root = _folio_root(tmp_path, [(16, 4)])  # pid 4242 maps PFNs 16-19 at pages 16-19
    rmap = ReverseMap(ProcessFilter(Exclusions(), root, self_pid=1), root)
    rmap.refresh()
    kernel = FakeKernel({16: [-errno.EBUSY]})
    result = PidMover(rmap, MoverParams(busy_backoff=0), root, kernel).move(
        _batch([16, 17, 18, 19, 32]))
    assert [(pid, pages) for pid, pages, _, _ in kernel.calls] == [(4242, [16, 22]),
                                                                  (4242, [16])]
    assert sorted(result.moved.tolist()) == [16, 17, 18, 19, 32]
    assert sorted(result.new_pfns.tolist()) == [16, 17, 18, 19, 32]  # read back from pagemap
    assert not result.failures

@pytest.mark.parametrize("kind", ["phys", "pid"])
def test_the_daemon_reads_a_batchs_kpageflags_once_for_the_safety_check_and_the_folios(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    shutil.copytree(FIXTURES, tmp_path, symlinks=True, dirs_exist_ok=True)
    # pid 4242 maps PFNs 16-19 (one folio) and 32; PFN 15, mlocked, shifts the flags
    # of the pages kept: the mover must get the kept pages' own.
    root = _folio_root(tmp_path, [(16, 4)], mlocked=(15,))
    mover: Mover
    if kind == "phys":
        phys = FolioPhys([(16, 4)])
        mover = PhysMover(phys, MoverParams(busy_backoff=0))
    else:
        pid = FakeKernel()
        rmap = ReverseMap(ProcessFilter(Exclusions(), root, self_pid=1), root)
        rmap.refresh()
        mover = PidMover(rmap, MoverParams(busy_backoff=0), root, pid)

    def build(config: Config, r: HostRoot, _pace: Pace) -> Pipeline:
        return Pipeline(Topology({}, ()), HeatModel(64), [], {}, mover,
                        ProcessFilter(Exclusions(), r), ExitStack())

    daemon = Daemon(Config(), root=root, build=build)
    daemon.start()
    opens: list[HostRoot] = []
    real_kpageflags = kpf.kpageflags
    monkeypatch.setattr(kpf, "kpageflags", lambda r: opens.append(r) or real_kpageflags(r))
    summary = daemon.move(Plan((_batch([15, 16, 17, 18, 19, 32]),)))
    assert opens == [root]
    assert summary.moved[(Direction.DEMOTE, 0, 1)] == 5 and not summary.failures
    if kind == "phys":
        assert phys.calls == [[16, 17, 18, 19, 32]]  # the kernel resolves the folio
    else:
        assert [(p, pages) for p, pages, _, _ in pid.calls] == [(4242, [16, 22])]


# --- in the lab ----------------------------------------------------------------------------

THP_BYTES = 2 << 20


def _thp_buffer(size: int) -> np.ndarray:
    """A written, THP-aligned private anonymous buffer (shared anon memory is shmem, whose
    THPs are off by default); unmapped when the last view of it goes."""
    buf = mmap.mmap(-1, size + THP_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(buf, dtype=np.uint8)
    skip = -base.ctypes.data % THP_BYTES
    buf.madvise(mmap.MADV_HUGEPAGE, skip, size)
    view = base[skip:skip + size]
    view[::PAGE] = 1  # write-fault: a read would map the huge zero page
    return view


@pytest.mark.vm(kernels=["tierd"])
def test_phys_mover_moves_thp_backed_memory_and_counts_every_page_moved() -> None:
    from tierd.kernel.move_phys import move_phys_pages_into  # the lab kernel's syscall

    npages = (32 << 20) // PAGE
    view = _thp_buffer(npages * PAGE)
    addrs = view.ctypes.data + PAGE * np.arange(npages, dtype=np.uint64)
    assert (numa.move_pages(0, addrs, np.zeros(npages, np.int32)) == 0).all()
    pfns = np.sort(pagemap.pfns_of(os.getpid(), addrs))
    flags = kpf.read_flags(0, int(pfns.max()) + 1)[pfns.astype(np.intp)]
    assert kpf.has_any(flags, kpf.KPF_THP).mean() > 0.9, "the kernel gave us THPs"
    result = PhysMover(move_phys_pages_into).move(Batch(Direction.DEMOTE, 0, 1, pfns))
    assert result.failures == {} and result.not_moved.size == 0
    assert result.moved.size == npages
    assert (numa.move_pages(0, addrs) == 1).all()


# --- dry run -------------------------------------------------------------------------------


def test_a_dry_run_counts_each_page_once_per_target_node() -> None:
    ledger = WouldMoveLedger()
    assert ledger.record(np.array([30, 10, 20], dtype=np.uint64), target=1) == 3
    # After the cooldown the same unmoved pages are picked again: nothing new.
    assert ledger.record(np.array([10, 20, 30], dtype=np.uint64), target=1) == 0
    assert ledger.record(np.array([20, 40], dtype=np.uint64), target=1) == 1
    # 20 would now come back to node 0: a new decision; so would going down again.
    assert ledger.record(np.array([20], dtype=np.uint64), target=0) == 1
    assert ledger.record(np.array([20, 5], dtype=np.uint64), target=1) == 2
    assert ledger.pfns.tolist() == [5, 10, 20, 30, 40]
    assert ledger.targets.tolist() == [1, 1, 1, 1, 1]


@pytest.mark.parametrize("pfns", [
    [100, 101, 102, 103],  # one gap-free range: read straight into the result
    [3, 4, 4, 6, 900, 901, 2000],  # repeats, a small gap, runs far apart
    [10, 11, 12, 1000, 1001, 1003],  # a gap-free run, then one with a gap
    [5, 5, 7],  # a repeat and a gap that add up to a gap-free length
    [900, 3, 901, 3],  # out of order: read sorted, answered in the caller's order
])
def test_read_at_gives_each_pfn_its_own_entry(tmp_path: Path, pfns: list[int]) -> None:
    (tmp_path / "proc").mkdir()
    (np.arange(4096, dtype=np.uint64) * np.uint64(7)).tofile(tmp_path / "proc/kpageflags")
    with kpf.kpageflags(HostRoot(tmp_path)) as flags_file:
        got = flags_file.read_at(np.array(pfns, dtype=np.uint64))
    assert got.tolist() == [7 * p for p in pfns]


# A process that joins a cgroup, faults in `size` bytes, prints their address and waits.
_CGROUP_CHILD = """
import mmap, sys
import numpy as np
open(f"/sys/fs/cgroup{sys.argv[1]}/cgroup.procs", "w").write("0")
buf = mmap.mmap(-1, int(sys.argv[2]), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
a = np.frombuffer(buf, dtype=np.uint8)
a[::4096] = 7
print(a.ctypes.data, flush=True)
sys.stdin.read()
"""


@pytest.mark.vm
def test_the_kernel_refuses_a_node_outside_the_tasks_cpuset_and_no_page_moves() -> None:
    cgroups, group = Path("/sys/fs/cgroup"), "/tierd-test-node0-only"
    (cgroups / "cgroup.subtree_control").write_text("+cpuset")
    (cgroups / group.lstrip("/")).mkdir(exist_ok=True)
    (cgroups / group.lstrip("/") / "cpuset.mems").write_text("0")
    npages = 256
    child = subprocess.Popen([sys.executable, "-c", _CGROUP_CHILD, group, str(npages * PAGE)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        addrs = int(child.stdout.readline()) + PAGE * np.arange(npages, dtype=np.uint64)
        assert (numa.move_pages(child.pid, addrs) == 0).all()
        rmap = ReverseMap(ProcessFilter(Exclusions()))
        rmap.refresh()
        batch = Batch(Direction.DEMOTE, 0, 1, np.sort(pagemap.pfns_of(child.pid, addrs)))
        result = PidMover(rmap).move(batch)
        assert result.failures == {"node_not_allowed": npages}
        assert (numa.move_pages(child.pid, addrs) == 0).all()
    finally:
        child.kill()
        child.wait()
        (cgroups / group.lstrip("/")).rmdir()


def _forked_mapper(view: npt.NDArray[np.uint8], cgroup: Path | None) -> tuple[int, int]:
    """A child that joins `cgroup`, maps every page of the shared `view` (fork does not
    copy a shared mapping's page tables: its reads fault the pages in) and waits.
    Returns its pid and the pipe end whose closing ends it."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)  # else the parent's close would never end the read below
            os.close(ready_r)
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text("0")
            int(view[::PAGE].sum())
            os.write(ready_w, b"1")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid, go_w


def _end(pid: int, go: int) -> None:
    os.close(go)
    os.waitpid(pid, 0)


@pytest.mark.vm
def test_shared_pages_move_only_where_every_mappers_cpuset_allows() -> None:
    """move_pages(MPOL_MF_MOVE_ALL) would move them for the called task alone."""
    cgroups = Path("/sys/fs/cgroup")
    group = cgroups / "tierd-test-shared-node0"
    (cgroups / "cgroup.subtree_control").write_text("+cpuset")
    group.mkdir(exist_ok=True)
    (group / "cpuset.mems").write_text("0")
    npages = 256
    buf = mmap.mmap(-1, npages * PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(buf, dtype=np.uint8)
    view[::PAGE] = 5
    addrs = view.ctypes.data + PAGE * np.arange(npages, dtype=np.uint64)
    assert (numa.move_pages(0, addrs, np.zeros(npages, np.int32)) == 0).all()

    def demote() -> dict[str, int]:
        rmap = ReverseMap(ProcessFilter(Exclusions(), self_pid=1))  # this process is a mapper
        rmap.refresh()
        pfns = np.sort(pagemap.pfns_of(os.getpid(), addrs))
        with kpf.kpagecount() as counts:
            assert (counts.read_at(pfns) == 2).all()
        result = PidMover(rmap).move(Batch(Direction.DEMOTE, 0, 1, pfns))
        return {**result.failures, "moved": int(result.moved.size)}

    try:
        pid, go = _forked_mapper(view, group)  # a mapper whose cpuset has node 0 alone
        try:
            assert demote() == {"mapper_not_allowed": npages, "moved": 0}
            assert (numa.move_pages(0, addrs) == 0).all()
        finally:
            _end(pid, go)
        pid, go = _forked_mapper(view, None)
        try:
            assert demote() == {"moved": npages}
            assert (numa.move_pages(0, addrs) == 1).all()
        finally:
            _end(pid, go)
    finally:
        del view
        buf.close()
        group.rmdir()
