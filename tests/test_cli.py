"""The `tierd` console script: global options, exit statuses, output for scripts and people."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tierd import __version__, cli
from tierd.collectors.evidence import IdleScan
from tierd.commands import probe as probe_command
from tierd.commands import run as run_command
from tierd.config import Config, MetricsConfig
from tierd.daemon import IntervalSummary
from tierd.service import lock, logs
from tierd.telemetry import DaemonState
from tierd.trace import IntervalRecord, TraceWriter
from tierd.vocabulary import Capability, Direction, NodeFacts

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TIERD = [sys.executable, "-m", "tierd"]


def test_version_from_the_console_script() -> None:
    out = subprocess.run([*TIERD, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"tierd {__version__}"


def test_no_command_prints_help_and_fails() -> None:
    done = subprocess.run(TIERD, capture_output=True, text=True)
    assert done.returncode == 2
    assert "usage: tierd" in done.stdout


def test_cli_reference_doc_is_up_to_date() -> None:
    committed = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    assert cli.render_reference() == committed, "docs/cli.md is stale: run `make docs`"


def test_the_cli_reference_shows_every_command_and_option() -> None:
    reference = cli.render_reference()
    for name in cli.COMMANDS:
        assert f"## `tierd {name}`" in reference
    assert "--dry-run" in reference and "--print-reference" in reference
# --- logs -----------------------------------------------------------------------------


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("tierd.run", level, __file__, 1, message, None, None)


def test_json_log_lines_carry_time_level_logger_and_message() -> None:
    line = logs.JsonFormatter().format(record('moved 3 pages "fast"', logging.WARNING))
    fields = json.loads(line)
    assert fields["level"] == "warning" and fields["logger"] == "tierd.run"
    assert fields["msg"] == 'moved 3 pages "fast"'
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"])


def test_logfmt_quotes_only_values_that_need_it() -> None:
    line = logs.LogfmtFormatter().format(record("interval 3: nothing moved"))
    assert re.fullmatch(r'time=\S+ level=info logger=tierd\.run msg="interval 3: nothing moved"',
                        line), line


@pytest.mark.parametrize(("argv", "level", "kind"), [
    ([], logging.INFO, logging.Formatter),
    (["-v"], logging.DEBUG, logging.Formatter),
    (["--log-level", "warning", "--log-format", "json"], logging.WARNING, logs.JsonFormatter),
    (["--log-format", "logfmt"], logging.INFO, logs.LogfmtFormatter),
])
def test_global_log_options_set_level_and_format(argv: list[str], level: int, kind: type,
                                                 tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("")
    assert cli.main([*argv, "check-config", str(tmp_path / "c.yaml")]) == 0
    root = logging.getLogger()
    assert root.level == level
    (handler,) = root.handlers
    assert type(handler.formatter) is kind


def test_each_interval_at_debug_the_first_and_a_periodic_summary_at_info(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # start, then one reading per interval; the third is past the summary period
    clock = iter([0.0, 10.0, 20.0, 700.0, 700.0, 710.0])
    monkeypatch.setattr(run_command.time, "monotonic", lambda: next(clock))
    moved = IntervalSummary()
    moved.moved[(Direction.PROMOTE, 1, 0)] = 256
    intervals = run_command.IntervalLog(every=600)
    with caplog.at_level(logging.DEBUG, logger="tierd.run"):
        for number, summary in enumerate([IntervalSummary(), moved, IntervalSummary(), moved],
                                         1):
            intervals.add(number, summary)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == 4 and debug[0] == "interval 1: nothing moved"
    assert info == ["first interval: nothing moved",
                    "last 3 intervals: promoted 256 pages (1.0 MiB) 1->0"]


# --- probe ----------------------------------------------------------------------------


def fake_probes(*usable: str):
    names = ("topology", "idle_page_tracking", "perf-pmu", "perf-events", "damon")
    return lambda root: [Capability(n, n in usable, "" if n in usable else "missing")
                         for n in names]


@pytest.mark.parametrize(("usable", "status"), [
    (("topology", "idle_page_tracking"), 0),
    (("topology", "perf-pmu", "perf-events"), 0),
    (("topology", "damon"), 0),
    (("topology", "perf-pmu"), 4),  # a PMU tierd may not open
    (("topology",), 4),
    (("idle_page_tracking",), 4),
])
def test_probe_exits_4_when_tierd_could_only_observe(
        usable: tuple[str, ...], status: int, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(probe_command, "run_probes", fake_probes(*usable))
    assert cli.main(["probe"]) == status
    assert ("would only observe" in capsys.readouterr().err) == (status == 4)


def test_probe_into_a_closed_pipe_ends_quietly() -> None:
    """`tierd probe | head -0`: no traceback, and the shell's status for SIGPIPE."""
    proc = subprocess.Popen([*TIERD, "probe", "--root", str(FIXTURES / "idle" / "two-node")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == cli.EXIT_BROKEN_PIPE
    assert "Traceback" not in err and "Exception ignored" not in err, err


# --- --json everywhere ----------------------------------------------------------------


def subcommand_parsers() -> dict[str, object]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_has_json(command: str) -> None:
    sub = subcommand_parsers()[command]
    assert any("--json" in a.option_strings for a in sub._actions)


def test_check_config_json_names_each_problem(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("interval: 0\nmovers: {batch_pages: many}\n")
    assert cli.main(["check-config", "--json", str(bad)]) == 78
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["file"] == str(bad)
    assert [(p["key"], p["line"]) for p in doc["problems"]] == [
        ("interval", 1), ("movers.batch_pages", 2)]
    assert cli.main(["check-config", "--json", str(REPO / "config/tierd.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_run_summary_as_json() -> None:
    state = DaemonState(mover="pid")
    state.record_moved(Direction.PROMOTE, 1, 0, 3)
    state.record_failures({"EBUSY": 2})
    state.finish_interval()
    doc = run_command.summary_document(state.snapshot())
    assert doc == {"intervals": 1, "mover": "pid", "dry_run": False,
                   "pages": {"promote": 3, "demote": 0},
                   "bytes": {"promote": 3 * 4096, "demote": 0}, "not_moved": {"EBUSY": 2}}
    assert run_command.summary_line(state.snapshot()).startswith("tierd: 1 interval, ")


# --- simulate -------------------------------------------------------------------------


def cold_trace(path: Path, intervals: int) -> Path:
    """A fast node (128 pages, none free) of idle pages over a slow node with room,
    whose first 200 pages are accessed in every scan (they wait for room)."""
    writer = TraceWriter(path)
    ages = np.full(1152, 5, dtype=np.uint8)
    ages[128:328] = 0
    for _ in range(intervals):
        nodes = [NodeFacts(0, 0, ((0, 128),), 128, 0, 4),
                 NodeFacts(1, 1, ((128, 1152),), 1024, 1000, 4)]
        writer.write(IntervalRecord(1152, 4096, 1.0, 10_000, nodes,
                                    idle=[IdleScan(0, ages, 0.0)], samples=[], regions=[]))
    writer.close()
    return path


def test_simulate_totals_stay_within_node_capacity(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    trace = cold_trace(tmp_path / "trace", 30)
    config = tmp_path / "policy.yaml"
    config.write_text("policy: {hysteresis_intervals: 1}\n")
    assert cli.main(["simulate", "--json", str(trace), "--config", str(config)]) == 0
    doc = json.loads(capsys.readouterr().out)
    demoted = sum(m["pages"] for m in doc["total"]["moves"] if m["direction"] == "demote")
    assert 0 < demoted <= 128, "more demoted than the node holds"
    assert doc["total"]["intervals"] == 30 and len(doc["intervals"]) == 30


# --- one tierd per host, and reloads --------------------------------------------------


def test_a_second_instance_is_refused_naming_the_first(tmp_path: Path) -> None:
    path = tmp_path / "run" / "lock"
    first = lock.InstanceLock(path).acquire()
    try:
        with pytest.raises(lock.AlreadyRunning, match=rf"pid {os.getpid()} holds {path}"):
            lock.InstanceLock(path).acquire()
    finally:
        first.release()
    lock.InstanceLock(path).acquire().release()  # free again once the first is gone


def test_tierd_run_exits_75_while_another_holds_the_lock(tmp_path: Path) -> None:
    path = lock.lock_path({"RUNTIME_DIRECTORY": str(tmp_path)})
    assert path == tmp_path / "lock"
    assert lock.lock_path({}) == Path("/run/tierd/lock")
    held = lock.InstanceLock(path).acquire()
    try:
        done = subprocess.run([*TIERD, "run", "--once", "--dry-run"], capture_output=True,
                              text=True, env={**os.environ, "RUNTIME_DIRECTORY": str(tmp_path)},
                              timeout=120)
    finally:
        held.release()
    assert done.returncode == run_command.EX_TEMPFAIL, done.stderr
    assert "another tierd is running" in done.stderr


def test_reload_names_each_setting_that_needs_a_restart() -> None:
    running = Config()
    new = dataclasses.replace(running, interval=2.0, kernel_tiering="refuse",
                              metrics=MetricsConfig(port=9800))
    assert run_command.restart_needed(running, new) == [
        "kernel_tiering (warn -> refuse)", "metrics.port (9748 -> 9800)"]
    assert run_command.restart_needed(running, dataclasses.replace(running, interval=2.0)) == []
