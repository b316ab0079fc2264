"""The lab itself: the guest has the topology tierd is built for, on both kernels."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pytest

from lab import vm
from tierd.kernel.numa import move_pages

NODES = Path("/sys/devices/system/node")
TIERS = Path("/sys/devices/virtual/memory_tiering")
PAGE = mmap.PAGESIZE


def test_topology_args_make_node1_slower_and_cpuless() -> None:
    args = vm.topology_args("2G", "1G")
    assert args[args.index("-m") + 1] == "3072M"
    numa = [args[i + 1] for i, a in enumerate(args) if a == "-numa"]
    assert "node,nodeid=1,memdev=m1,initiator=0" in numa
    assert all("node-id=0" in n for n in numa if n.startswith("cpu,"))
    latency = {n.split("target=")[1][0]: n.rsplit("=", 1)[1]
               for n in numa if "access-latency" in n}
    assert int(latency["1"]) > int(latency["0"])


# The shape of today's early panic (6.12 oops format; addresses made up): the
# kernel dies in an interrupt on a vCPU before init runs, panic=-1 reboots at
# once and -no-reboot makes QEMU exit, so no rc, no dmesg, no "lab-guest:" line.
EARLY_PANIC = """\
[    0.000000] Linux version 6.12.118 (root@lab) #1 SMP PREEMPT_DYNAMIC
[    0.873121] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[    0.873121] CPU: 1 UID: 0 PID: 0 Comm: swapper/1 Not tainted 6.12.118 #1
[    0.873121] RIP: 0010:sched_clock_tick+0x1d/0x80
[    0.873121] Call Trace:
[    0.873121]  <IRQ>
[    0.873121]  update_process_times+0x6e/0xa0
[    0.873121] Kernel panic - not syncing: Fatal exception in interrupt
"""
STARTED = "lab-guest: 6.12.118 up in 2.41 s\n"
SYSRQ_PANIC = """\
[    9.120000] sysrq: Trigger a crash
[    9.120000] Kernel panic - not syncing: sysrq triggered crash
"""


def _result(tmp_path: Path, rc: int | None, console: str, *, started: bool) -> vm.GuestResult:
    return vm.GuestResult(rc, console, "", tmp_path, started)


def test_panic_line_drops_the_timestamp() -> None:
    assert vm.panic_line(EARLY_PANIC) == (
        "Kernel panic - not syncing: Fatal exception in interrupt"
    )
    assert vm.panic_line(STARTED + "1 failed in 3.2s\n") is None


def test_early_panic_only_before_the_command_started(tmp_path: Path) -> None:
    early = _result(tmp_path, None, EARLY_PANIC, started=False)
    assert vm.early_panic(early) == "Kernel panic - not syncing: Fatal exception in interrupt"
    # The command ran and failed: its result, whatever it is, stands.
    failed = _result(tmp_path, 1, STARTED + "1 failed in 3.2s\n", started=True)
    assert vm.early_panic(failed) is None
    # The command itself crashed the kernel: a real failure, not a flaky boot.
    crashed = _result(tmp_path, None, STARTED + SYSRQ_PANIC, started=True)
    assert vm.early_panic(crashed) is None
    # No panic at all (a hang killed by the timeout): nothing says a retry helps.
    hung = _result(tmp_path, None, "lab: QEMU killed after 3600 s\n", started=False)
    assert vm.early_panic(hung) is None


def _fake_boots(
    monkeypatch: pytest.MonkeyPatch, results: list[vm.GuestResult]
) -> list[vm.GuestResult]:
    """Make vm.boot's single boots return `results` in turn; returns those not used."""
    left = list(results)

    def boot_once(*args: object, **kwargs: object) -> vm.GuestResult:
        return left.pop(0)

    monkeypatch.setattr(vm, "_boot_once", boot_once)
    return left


def _stock() -> vm.LabKernel:
    return vm.LabKernel("stock", Path("/nonexistent"), "6.12", None)


def test_boot_retries_an_early_panic_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = _result(tmp_path, 0, STARTED, started=True)
    left = _fake_boots(monkeypatch, [_result(tmp_path, None, EARLY_PANIC, started=False), ok])
    logged: list[str] = []
    result = vm.boot(_stock(), "true", log=logged.append)
    assert (result.rc, result.started, left) == (0, True, [])
    assert result.early_panics == ("Kernel panic - not syncing: Fatal exception in interrupt",)
    assert logged == [
        "lab: guest panicked before its command started:"
        " Kernel panic - not syncing: Fatal exception in interrupt; booting again (2 of 3)"
    ]


def test_boot_gives_up_after_its_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    panics = [_result(tmp_path, None, EARLY_PANIC, started=False) for _ in range(4)]
    left = _fake_boots(monkeypatch, panics)
    logged: list[str] = []
    result = vm.boot(_stock(), "true", attempts=3, log=logged.append)
    assert result.rc is None and len(left) == 1 and len(logged) == 2
    assert len(result.early_panics) == 2  # the last boot's panic is in its own console


@pytest.mark.parametrize(
    ("rc", "console"), [(1, STARTED + "1 failed\n"), (None, STARTED + SYSRQ_PANIC)]
)
def test_boot_never_retries_a_command_that_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rc: int | None, console: str
) -> None:
    ran = _result(tmp_path, rc, console, started=True)
    left = _fake_boots(monkeypatch, [ran, _result(tmp_path, 0, STARTED, started=True)])
    logged: list[str] = []
    result = vm.boot(_stock(), "true", log=logged.append)
    assert (result.rc, len(left), logged, result.early_panics) == (rc, 1, [], ())


def _tier_of(node: int) -> int:
    for tier in TIERS.glob("memory_tier*"):
        nodelist = (tier / "nodelist").read_text().strip()
        if str(node) in nodelist.replace("-", ",").split(","):
            return int(tier.name.removeprefix("memory_tier"))
    raise AssertionError(f"node {node} is in no memory tier")


@pytest.mark.vm
def test_two_nodes_node1_cpuless_and_in_a_lower_tier() -> None:
    assert (NODES / "online").read_text().strip() == "0-1"
    assert (NODES / "node0/cpulist").read_text().strip() == "0-1"
    assert (NODES / "node1/cpulist").read_text().strip() == ""
    # A higher memory_tier id is a higher abstract distance: a slower tier.
    assert _tier_of(1) > _tier_of(0)


@pytest.mark.vm
def test_page_idle_only_on_the_tierd_kernel(lab_kernel: str) -> None:
    bitmap = Path("/sys/kernel/mm/page_idle/bitmap")
    if lab_kernel == "stock":
        assert not bitmap.exists()
    else:
        with open(bitmap, "rb") as f:
            f.seek(4096 * 8)
            assert len(f.read(4096)) == 4096


@pytest.mark.vm
def test_move_pages_moves_a_page_to_node1_and_back() -> None:
    npages = 16
    buf = mmap.mmap(-1, npages * PAGE)
    view = np.frombuffer(buf, dtype=np.uint8)
    view[:] = np.arange(view.size, dtype=np.uint64).astype(np.uint8)
    expected = view.copy()
    base = view.ctypes.data
    addrs = base + PAGE * np.arange(npages, dtype=np.uint64)
    try:
        assert (move_pages(0, addrs) == 0).all()
        assert (move_pages(0, addrs, np.ones(npages)) == 1).all()
        assert (move_pages(0, addrs) == 1).all()
        assert (move_pages(0, addrs, np.zeros(npages)) == 0).all()
        assert (move_pages(0, addrs) == 0).all()
        assert np.array_equal(view, expected)
    finally:
        del view
        buf.close()
