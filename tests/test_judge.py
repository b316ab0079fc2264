"""The judge plugin (benchmarks/judge) against a workload with a known answer."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import access

from lab import vm

# 64 MiB read 40 times: 655,360 loads, all on one node.
PAGES, PASSES = 16384, 40
# Stated tolerance: the loads are counted exactly; what else the reader does
# in the window (nothing: it is blocked in read(2)) and rounding stay within 1%.
TOLERANCE = 0.01

def test_plugin_ram_ranges_double_each_backends_start() -> None:
    gib = 1 << 30
    # 2 GiB + 2 GiB crosses the PCI hole in the guest; the plugin never sees it.
    assert vm.plugin_ram_ranges("2G", "2G") == {0: [(0, 2 * gib)], 1: [(4 * gib, 6 * gib)]}
    assert vm.plugin_ram_ranges("768M", "1536M") == {
        0: [(0, 768 << 20)], 1: [(1536 << 20, 3072 << 20)]}


def test_plugin_args_name_each_node_and_the_share(tmp_path: Path) -> None:
    args = dict(access.plugin_args({0: [(0, 0x1000), (0x2000, 0x3000)], 1: [(0x3000, 0x4000)]}))
    assert args == {"out": "{outdir}/judge.tsv", "user": "on", "vcpu": "1",
                    "node0": "0x0-0x1000:0x2000-0x3000", "node1": "0x3000-0x4000"}
    option = vm.Plugin(access.PLUGIN, tuple(args.items())).option(tmp_path)
    assert f"out={tmp_path}/judge.tsv" in option.split(",")


def append(path: Path, text: str) -> None:
    with open(path, "a") as out:
        out.write(text)


def test_counts_wait_for_lines_summed_after_the_call(tmp_path: Path) -> None:
    path = tmp_path / "judge.tsv"
    path.write_text("1.000 10 20 0\n2.000 11 25 1\n3.000 12")  # the last line is partial
    counts = access.Counts(path)
    assert counts.latest() == access.Reading(2.0, (11, 25), 1)
    with pytest.raises(RuntimeError, match="no new line"):
        counts.fresh(timeout=0.3)
    append(path, " 30 1\n")
    # 4.000 may have been summed before fresh() began, 5.000 was not.
    first = threading.Timer(0.2, append, (path, "4.000 14 31 1\n"))
    second = threading.Timer(0.6, append, (path, "5.000 15 33 1\n"))
    first.start()
    second.start()
    assert counts.fresh(timeout=10) == access.Reading(5.0, (15, 33), 1)


def judge_plugin(kernel: vm.LabKernel) -> vm.Plugin:
    """The judge, counting the user accesses of the workload's vCPU on the lab's nodes."""
    return vm.Plugin(access.PLUGIN, access.plugin_args(vm.plugin_ram_ranges("2G", "2G")))


def read_on(node: int) -> tuple[int, ...]:
    """Accesses per node while known_reads reads a buffer on `node`."""
    counts = access.Counts()
    reader = subprocess.Popen(
        [str(access.KNOWN_READS), str(PAGES), str(node), str(PASSES)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=access.pin_workload,
    )
    assert reader.stdin and reader.stdout and reader.stderr
    try:
        assert reader.stdout.readline() == "ready\n", reader.stderr.read()
        before = counts.fresh()
        reader.stdin.write("go\n")
        reader.stdin.flush()
        assert reader.stdout.readline().startswith("done ")
        after = counts.fresh()
    finally:
        reader.stdin.close()
        assert reader.wait(60) == 0
    return tuple(a - b for a, b in zip(after.nodes, before.nodes, strict=True))


@pytest.mark.vm(kernels=["stock"], qemu_plugin=judge_plugin)
@pytest.mark.parametrize("node", [1, 0])
def test_judge_counts_each_read_on_the_node_that_served_it(node: int) -> None:
    affinity = os.sched_getaffinity(0)
    access.pin_harness()
    try:
        served = read_on(node)
    finally:
        os.sched_setaffinity(0, affinity)
    expected = PAGES * PASSES
    assert expected <= served[node] <= expected * (1 + TOLERANCE), served
    assert served[1 - node] <= expected * TOLERANCE, served


def test_tierd_never_reads_the_judge() -> None:
    """The judge grades placement; feeding it to the policy would grade its own homework."""
    tierd = Path(__file__).resolve().parent.parent / "tierd"
    readers = [p for p in tierd.rglob("*.py")
               if access.COUNTS in p.read_text() or "judge" in p.read_text().lower()]
    assert readers == []
