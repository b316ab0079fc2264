"""move_phys_pages: discovery on fixture trees; the kernel series and its selftest in the lab."""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from lab import vm
from tierd.kernel import move_phys
from tierd.kernel.move_phys import (
    SYSCALL_NR_FILE,
    MovePhysPagesError,
    MovePhysPagesSupport,
    move_phys_pages,
    probe,
)
from tierd.kernel.numa import move_pages
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
# Round trips of 256 MiB in the integrity test: each takes a few seconds under TCG.
INTEGRITY_ROUNDS = os.environ.get("MOVE_PHYS_PAGES_ROUNDS", "8")


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


def _series_of(applied: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in applied.glob("*.patch")
            if p.name != "0000-cover-letter.patch"}


def _lab_build_tree() -> Path:
    """The lab's kernel build tree, which build-kernel.sh patched with this checkout's series."""
    wanted = _series_of(PATCHES)
    trees = sorted((vm.CACHE / "src").glob("linux-*"))
    for tree in trees:
        if _series_of(tree / ".tierd-applied") == wanted:
            return tree
    pytest.fail(f"no lab build tree in {vm.CACHE / 'src'} carries {PATCHES}: "
                "run tests/lab/build-kernel.sh")


@pytest.fixture
def selftest(support: MovePhysPagesSupport, tmp_path: Path) -> Path:
    """tools/testing/selftests/mm/move_phys_pages from the series, compiled in the guest."""
    tree = _lab_build_tree()
    binary = tmp_path / "move_phys_pages"
    build = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-I", str(tree / SELFTEST_DIR),
         "-o", str(binary), str(tree / SELFTEST), "-lpthread"],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, build.stderr
    return binary


def _run_selftest(binary: Path, *args: str, env: dict[str, str] | None = None) -> set[str]:
    """Run the kselftest binary; every test must pass, none may skip. Returns their names."""
    done = subprocess.run([str(binary), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)
    output = done.stdout + done.stderr
    results = [line for line in done.stdout.splitlines()
               if line.startswith(("ok ", "not ok "))]
    assert done.returncode == 0, output
    assert results, output
    assert all(line.startswith("ok ") and "# SKIP" not in line for line in results), output
    return {line.split()[2] for line in results}  # "ok 3 phys.bad_flags_get_einval"


@pytest.mark.vm
def test_the_kernel_publishes_move_phys_pages_as_syscall_500(support: MovePhysPagesSupport) -> None:
    assert support.number == 500
    assert Path(SYSCALL_NR_FILE).read_text() == "500\n"


@pytest.mark.vm
def test_selftest_moves_by_physical_address_and_reports_each_error(selftest: Path) -> None:
    passed = _run_selftest(selftest, "-F", "integrity")
    assert passed == {f"phys.{name}" for name in (
        "round_trip_to_node1_and_back", "query_mode_reports_each_node",
        "unprivileged_caller_gets_eperm", "bad_flags_get_einval",
        "node_without_memory_gets_enodev", "non_user_pages_get_per_page_errors",
        "shared_page_needs_move_all", "node_outside_the_mapping_tasks_cpuset_gets_eacces",
        "thp_tail_pfn_moves_the_whole_folio",
    )}


@pytest.mark.vm
def test_256_mib_keep_their_content_while_moving_under_concurrent_writers(selftest: Path) -> None:
    passed = _run_selftest(selftest, "-f", "integrity",
                           env={"MOVE_PHYS_PAGES_ROUNDS": INTEGRITY_ROUNDS})
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
