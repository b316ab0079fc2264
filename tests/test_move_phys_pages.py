"""move_phys_pages: discovery on fixtures; the kernel series, its selftest and a stress in the lab.

The lab tests run on the tierd kernel and on the debug kernel (DEBUG_VM,
lockdep, KASAN); a kernel report in dmesg fails them on either.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import random
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierd.kernel import move_phys
from tierd.kernel.move_phys import (
    MAX_PAGES,
    SYSCALL_NR_FILE,
    MovePhysPagesError,
    MovePhysPagesSupport,
    move_phys_pages,
    probe,
)
from tierd.kernel.numa import MPOL_MF_MOVE_ALL, move_pages
from tierd.kernel.root import HostRoot
from tierd.probe import PROBES, run_probe

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "move_phys"
PATCHES = REPO / "packaging" / "kernel" / "patches"
SELFTEST_DIR = Path("tools/testing/selftests")
SELFTEST = SELFTEST_DIR / "mm" / "move_phys_pages.c"
PAGE = mmap.PAGESIZE
PM_PRESENT = np.uint64(1 << 63)
PM_PFN_MASK = np.uint64((1 << 55) - 1)
MPOL_MF_STRICT = 1 << 0
# Round trips of 256 MiB in the integrity test (the debug kernel's checks make each slower).
INTEGRITY_ROUNDS = {"tierd": os.environ.get("MOVE_PHYS_PAGES_ROUNDS", "8"), "debug": "1"}
# Kernel reports that fail a lab test on the debug kernel (and on any other).
KERNEL_REPORT = re.compile(r"BUG:|WARNING:|KASAN|lockdep|circular locking|kernel BUG at"
                           r"|VM_BUG_ON|Oops|general protection fault")


def fixture(name: str) -> HostRoot:
    return HostRoot(FIXTURES / name)


# Discovery, on fixture trees.

def test_probe_reads_the_number_the_kernel_publishes() -> None:
    support = probe(fixture("tierd"))
    assert support == MovePhysPagesSupport("move_phys_pages", True, "syscall 500", 500)
    assert (support.available, support.number) == (True, 500)
    assert str(support) == "move_phys_pages: available (syscall 500)"


def test_probe_without_the_sysfs_file_says_unavailable() -> None:
    support = probe(fixture("stock"))
    assert (support.available, support.number) == (False, None)
    assert str(support) == (
        f"move_phys_pages: unavailable ({SYSCALL_NR_FILE} missing: kernel without the tierd series)"
    )


@pytest.mark.parametrize(
    ("tree", "reason"),
    [
        ("malformed", "not a syscall number: 'five hundred'"),
        ("empty", "not a syscall number: ''"),
        ("mainline_number", "syscall 462 belongs to mainline (<= 469)"),
        ("x32_number", "syscall 530 is in the x32 range"),
    ],
)
def test_probe_refuses_a_file_that_proves_nothing(tree: str, reason: str) -> None:
    support = probe(fixture(tree))
    assert (support.available, support.number) == (False, None)
    # The reason names the file (under the fixture root) and what is wrong with it.
    assert support.reason == f"{FIXTURES / tree}{SYSCALL_NR_FILE}: {reason}"
    assert str(support).startswith("move_phys_pages: unavailable (")


@pytest.mark.parametrize("number", [0, 279, 454, 462, 469, 512, 547])
def test_wrapper_refuses_mainline_and_x32_numbers_before_any_syscall(number: int) -> None:
    with pytest.raises(ValueError, match=f"refusing to call syscall {number}"):
        move_phys_pages([0x1000], [1], nr=number)


def test_wrapper_without_a_proven_number_raises_enosys_before_any_syscall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(move_phys, "HOST", fixture("stock"))
    move_phys.proven_number.cache_clear()
    try:
        with pytest.raises(MovePhysPagesError) as raised:
            move_phys_pages([0x1000], [1])
    finally:
        move_phys.proven_number.cache_clear()
    assert raised.value.errno == errno.ENOSYS
    assert "kernel without the tierd series" in str(raised.value)


def test_the_probe_is_registered_with_tierd_probe() -> None:
    assert "tierd.kernel.move_phys:probe" in PROBES
    [capability] = run_probe("tierd.kernel.move_phys:probe", fixture("stock"))
    assert (capability.name, capability.usable) == ("move_phys_pages", False)


def test_wrapper_checks_shapes_before_any_syscall() -> None:
    with pytest.raises(ValueError, match="2 addresses but 1 nodes"):
        move_phys_pages([0x1000, 0x2000], [1], nr=500)


def test_wrapper_splits_arrays_longer_than_the_kernels_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int]] = []

    def call(nr: int, addrs: np.ndarray, nodes: np.ndarray, status: np.ndarray,
             flags: int) -> int:
        calls.append((int(addrs[0]), addrs.size))
        status[:] = nodes
        status[-1] = -errno.EBUSY
        return 1

    monkeypatch.setattr(move_phys, "_call", call)
    n = 2 * MAX_PAGES + 1
    status = np.empty(n, dtype=np.int32)
    failed = move_phys.move_phys_pages_into(np.arange(n, dtype=np.uint64),
                                            np.ones(n, dtype=np.int32), status, nr=500)
    assert calls == [(0, MAX_PAGES), (MAX_PAGES, MAX_PAGES), (2 * MAX_PAGES, 1)]
    assert failed == 3 and (status == -errno.EBUSY).sum() == 3


# The series and its man page, checked with the kernel's own tools.

MAN_PAGE = REPO / "packaging" / "kernel" / "man" / "move_phys_pages.2"
KERNEL_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
CHECKPATCH_FILES = ("scripts/checkpatch.pl", "scripts/spelling.txt",
                    "scripts/const_structs.checkpatch")


def test_man_page_renders_without_warnings() -> None:
    groff = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN_PAGE)],
                           capture_output=True, text=True, check=False)
    assert (groff.returncode, groff.stderr) == (0, "")
    man = subprocess.run(["man", "-l", str(MAN_PAGE)], capture_output=True, text=True,
                         env={**os.environ, "MANWIDTH": "80"}, check=False)
    assert (man.returncode, man.stderr) == (0, "")
    assert "move_phys_pages - move pages named by physical address" in " ".join(man.stdout.split())


@pytest.fixture(scope="module")
def checkpatch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/checkpatch.pl of the kernel the series is for, from the Debian source tarball."""
    if not KERNEL_TARBALL.exists():
        pytest.skip(f"{KERNEL_TARBALL} missing (apt-get install linux-source-6.12)")
    out = tmp_path_factory.mktemp("kernel")
    subprocess.run(["tar", "-xf", str(KERNEL_TARBALL), "-C", str(out), "--strip-components=1",
                    "--wildcards", *(f"*/{f}" for f in CHECKPATCH_FILES)], check=True)
    return out / CHECKPATCH_FILES[0]


@pytest.mark.parametrize("patch", sorted(p.name for p in PATCHES.glob("0*.patch")
                                         if p.name != "0000-cover-letter.patch"))
def test_checkpatch_strict_is_clean(checkpatch: Path, patch: str) -> None:
    done = subprocess.run(["perl", str(checkpatch), "--strict", "--no-tree",
                           str(PATCHES / patch)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "total: 0 errors, 0 warnings, 0 checks" in done.stdout, done.stdout


# The series in the lab.

@pytest.fixture
def support(lab_kernel: str) -> MovePhysPagesSupport:
    """The running kernel's move_phys_pages; on stock, skip once it is shown to have none."""
    found = probe()
    if lab_kernel == "stock":
        assert not found.available
        assert str(found) == (
            f"move_phys_pages: unavailable ({SYSCALL_NR_FILE} missing: "
            "kernel without the tierd series)"
        )
        pytest.skip(f"stock kernel has no move_phys_pages ({found.reason})")
    assert found.available, str(found)
    return found


def _kernel_reports() -> list[str]:
    done = subprocess.run(["dmesg"], capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if KERNEL_REPORT.search(line)]


@pytest.fixture
def clean_dmesg() -> Iterator[None]:
    """Fail the test if the kernel reports a bug, lockdep splat, KASAN error or warning."""
    before = len(_kernel_reports())
    yield
    new = _kernel_reports()[before:]
    assert not new, "kernel reports in dmesg:\n" + "\n".join(new)


@pytest.fixture
def selftest(support: MovePhysPagesSupport, tmp_path: Path) -> Path:
    """tools/testing/selftests/mm/move_phys_pages of the booted kernel's series, compiled."""
    # build-kernel.sh keeps the series' selftest sources next to the kernel.
    src = Path(os.environ["TIERD_LAB_KERNEL_DIR"]) / "selftest"
    binary = tmp_path / "move_phys_pages"
    build = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-I", str(src / SELFTEST_DIR),
         "-o", str(binary), str(src / SELFTEST), "-lpthread"],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, build.stderr
    return binary


def _run_selftest(binary: Path, *args: str, env: dict[str, str] | None = None) -> set[str]:
    """Run the kselftest binary; every test must pass. Returns the names of those that
    passed and of those that skipped, as "name" and "name # SKIP"."""
    done = subprocess.run([str(binary), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)
    output = done.stdout + done.stderr
    results = [line for line in done.stdout.splitlines()
               if line.startswith(("ok ", "not ok "))]
    assert done.returncode == 0, output
    assert results, output
    assert all(line.startswith("ok ") for line in results), output
    # "ok 3 phys.bad_flags_get_einval" or "ok 9 thp.x # SKIP why"
    return {line.split()[2] + (" # SKIP" if "# SKIP" in line else "") for line in results}


SELFTEST_CASES = {
    *(f"phys.{name}" for name in (
        "round_trip_to_node1_and_back", "query_mode_reports_each_node_and_moves_nothing",
        "mixed_targets_in_one_call", "duplicate_address_moves_once_for_its_first_target",
        "unprivileged_caller_gets_eperm", "bad_flags_get_einval_and_no_flags_mean_move",
        "more_entries_than_the_cap_get_e2big", "node_without_memory_gets_enodev",
        "non_user_pages_get_per_page_errors", "shared_page_needs_move_all",
        "mbind_policy_refuses_other_nodes", "held_pages_get_ebusy_and_the_rest_move",
        "file_pages_move_and_unmapped_page_cache_does_not")),
    "thp.tail_pfn_moves_the_whole_folio",
    "thp.every_address_and_a_duplicate_move_only_that_folio",
    "cpuset.node_outside_a_mapping_tasks_cpuset_gets_eperm",
    "hugetlb.page_moves_whole_from_any_of_its_addresses",
}
KSM_CASE = "ksm.merged_page_of_one_process_moves"


@pytest.mark.vm(kernels=["tierd"])
def test_the_kernel_publishes_move_phys_pages_as_syscall_500(support: MovePhysPagesSupport) -> None:
    assert support.number == 500
    assert Path(SYSCALL_NR_FILE).read_text() == "500\n"


@pytest.mark.vm(kernels=["stock", "tierd", "debug"])
def test_selftest_moves_every_page_type_and_reports_each_error(
        selftest: Path, lab_kernel: str, clean_dmesg: None) -> None:
    # KSM is configured in the debug kernel only; elsewhere its case skips.
    ksm = KSM_CASE if lab_kernel == "debug" else f"{KSM_CASE} # SKIP"
    assert _run_selftest(selftest, "-F", "integrity") == SELFTEST_CASES | {ksm}


@pytest.mark.vm(kernels=["stock", "tierd", "debug"])
def test_256_mib_keep_their_content_while_moving_under_concurrent_writers(
        selftest: Path, lab_kernel: str, clean_dmesg: None) -> None:
    passed = _run_selftest(selftest, "-f", "integrity",
                           env={"MOVE_PHYS_PAGES_ROUNDS": INTEGRITY_ROUNDS[lab_kernel]})
    assert passed == {"integrity.moves_under_concurrent_access"}


def _phys_addrs(buf_addr: int, npages: int) -> np.ndarray:
    """Physical addresses of our own pages, from /proc/self/pagemap (root sees PFNs)."""
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, 8 * npages, buf_addr // PAGE * 8)
    finally:
        os.close(fd)
    entries = np.frombuffer(raw, dtype=np.uint64)
    assert ((entries & PM_PRESENT) != 0).all()
    return (entries & PM_PFN_MASK) * np.uint64(PAGE)


@pytest.mark.vm
def test_numpy_wrapper_moves_pages_to_node1_and_back(support: MovePhysPagesSupport) -> None:
    npages = 32
    buf = mmap.mmap(-1, npages * PAGE)
    buf.madvise(mmap.MADV_NOHUGEPAGE)
    view = np.frombuffer(buf, dtype=np.uint8)
    view[:] = np.arange(view.size, dtype=np.uint64).astype(np.uint8) ^ 0x5A
    expected = view.copy()
    base = view.ctypes.data
    addrs = base + PAGE * np.arange(npages, dtype=np.uint64)
    nr = support.number
    assert nr is not None
    try:
        assert (move_pages(0, addrs, np.zeros(npages)) == 0).all()
        for node in (1, 0):
            before = _phys_addrs(base, npages)
            assert (move_phys_pages(before) == 1 - node).all()  # query mode
            assert (move_phys_pages(before, np.full(npages, node)) == node).all()
            assert (move_pages(0, addrs) == node).all()
            after = _phys_addrs(base, npages)
            assert (after != before).all()
            assert (move_phys_pages(after, nr=nr) == node).all()
        assert np.array_equal(view, expected)
    finally:
        del view
        buf.close()


@pytest.mark.vm
def test_numpy_wrapper_raises_when_the_whole_call_fails(support: MovePhysPagesSupport) -> None:
    buf = mmap.mmap(-1, PAGE)
    buf[0] = 1
    view = np.frombuffer(buf, dtype=np.uint8)
    try:
        paddr = _phys_addrs(view.ctypes.data, 1)
        with pytest.raises(MovePhysPagesError) as raised:
            move_phys_pages(paddr, [1], flags=MPOL_MF_STRICT)
        assert raised.value.errno == errno.EINVAL
    finally:
        del view
        buf.close()


# The stress: random physical addresses, moved with MPOL_MF_MOVE_ALL (so whatever user page
# is there moves: a lab guest only), while other processes make and unmake the memory.

STRESS_SECONDS = {"tierd": 60.0, "debug": 60.0}
STRESS_CALL = 4096  # addresses per call
# Every status the man page lists for move mode.
STRESS_STATUSES = {0, 1, -errno.ENOENT, -errno.EFAULT, -errno.EACCES, -errno.EPERM,
                   -errno.EBUSY, -errno.ENOMEM}


def _ram_pfns() -> np.ndarray:
    """Every PFN of System RAM, from /proc/iomem (root sees the addresses)."""
    ranges = []
    for line in Path("/proc/iomem").read_text().splitlines():
        if not line.startswith(" ") and line.endswith(": System RAM"):
            start, end = (int(x, 16) for x in line.split(" ")[0].split("-"))
            ranges.append(np.arange(-(-start // PAGE), (end + 1) // PAGE, dtype=np.uint64))
    return np.concatenate(ranges)


def _forker() -> None:
    """THP-backed memory, written, forked (the child writes and exits), unmapped."""
    while True:
        buf = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
        buf[::PAGE] = b"\x01" * (len(buf) // PAGE)
        child = os.fork()
        if child == 0:
            buf[::PAGE] = b"\x02" * (len(buf) // PAGE)
            os._exit(0)
        os.waitpid(child, 0)
        buf.close()


def _truncater() -> None:
    """A mapped memfd, written, then truncated under its mapping and regrown."""
    fd = os.memfd_create("stress")
    while True:
        os.ftruncate(fd, 16 << 20)
        buf = mmap.mmap(fd, 16 << 20)
        buf[::PAGE] = b"\x03" * (len(buf) // PAGE)
        os.ftruncate(fd, 0)
        buf.close()


def _compactor() -> None:
    while True:
        time.sleep(0.5)
        Path("/proc/sys/vm/compact_memory").write_text("1\n")


def _offliner() -> None:
    """Take node 1's last memory block offline and back, where the kernel can (hot-remove)."""
    blocks = sorted(Path("/sys/devices/system/node/node1").glob("memory[0-9]*"),
                    key=lambda p: int(p.name[6:]))
    if not blocks:
        return
    state = blocks[-1] / "state"
    while True:
        time.sleep(1.0)
        for value in ("offline", "online_movable"):
            with contextlib.suppress(OSError):  # busy or not removable: the race matters
                state.write_text(value)


@pytest.mark.vm(kernels=["tierd", "debug"])
def test_random_addresses_race_fork_munmap_truncate_compaction_and_offline(
        support: MovePhysPagesSupport, lab_kernel: str, clean_dmesg: None) -> None:
    pfns = _ram_pfns()
    rng = np.random.default_rng(25)
    racers = []  # processes of their own, killed at the end
    for racer in (_forker, _truncater, _compactor, _offliner):
        pid = os.fork()
        if pid == 0:
            try:
                racer()
            finally:
                os._exit(0)
        racers.append(pid)
    statuses: Counter[int] = Counter()
    calls = 0
    deadline = time.monotonic() + STRESS_SECONDS[lab_kernel]
    try:
        while time.monotonic() < deadline:
            sample = rng.choice(pfns, STRESS_CALL)
            # Duplicates and neighbours: several addresses in one large folio.
            sample[: STRESS_CALL // 4] = sample[STRESS_CALL // 4: STRESS_CALL // 2] + \
                rng.integers(0, 512, STRESS_CALL // 4).astype(np.uint64)
            addrs = sample << np.uint64(12)
            nodes = rng.integers(0, 2, STRESS_CALL).astype(np.int32)
            flags = random.choice((MPOL_MF_MOVE_ALL, 0))
            status = move_phys_pages(addrs, None if calls % 8 == 7 else nodes,
                                     flags=flags)
            statuses.update(status.tolist())
            calls += 1
    finally:
        for pid in racers:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        for block in Path("/sys/devices/system/node/node1").glob("memory[0-9]*"):
            if (block / "state").read_text().strip() == "offline":
                (block / "state").write_text("online_movable")
    print(f"stress: {calls} calls of {STRESS_CALL} random addresses: "
          + ", ".join(f"{errno.errorcode.get(-s, s) if s < 0 else f'node{s}'}={n}"
                      for s, n in sorted(statuses.items())))
    assert set(statuses) <= STRESS_STATUSES, statuses
    assert statuses[0] + statuses[1] > 0  # some user pages were found and moved
