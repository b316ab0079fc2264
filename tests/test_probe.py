"""The capability report: probe registry, failure isolation, `tierd probe`."""

from __future__ import annotations

import json

import pytest

from tierd.cli import main
from tierd.kernel.root import HostRoot
from tierd.probe import Capability, format_table, run_probe, run_probes

ROOT = HostRoot()


def probe_one(root: HostRoot) -> Capability:
    return Capability("one", True, "fine")


def probe_two(root: HostRoot) -> list[Capability]:
    return [Capability("two_a", False, "missing /x"), Capability("two_b", True)]


def probe_broken(root: HostRoot) -> Capability:
    raise RuntimeError("boom")


def test_probes_run_in_order_and_may_return_several() -> None:
    caps = run_probes(ROOT, ["test_probe:probe_one", "test_probe:probe_two"])
    assert [c.name for c in caps] == ["one", "two_a", "two_b"]
    assert [c.usable for c in caps] == [True, False, True]


def test_a_failing_probe_is_reported_unusable_not_raised() -> None:
    [cap] = run_probe("test_probe:probe_broken", ROOT)
    assert not cap.usable
    assert "test_probe:probe_broken failed: RuntimeError: boom" in cap.reason


def test_a_probe_module_that_cannot_import_is_reported() -> None:
    [cap] = run_probe("tierd.no_such_module:probe", ROOT)
    assert cap.name == "no_such_module"
    assert not cap.usable and "ModuleNotFoundError" in cap.reason


def test_table_aligns_names_and_says_why() -> None:
    table = format_table([Capability("a", True), Capability("longer", False, "no file")])
    assert table.splitlines() == ["a       usable", "longer  unavailable  no file"]


def test_probe_command_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--json"]) in (0, 4)  # 4: this host could not tier (test_cli.py)
    caps = json.loads(capsys.readouterr().out)
    assert all({"name", "usable", "reason"} <= set(c) for c in caps)  # probes may add fields
    assert [c["name"] for c in caps][:2] == ["topology", "idle_page_tracking"]
