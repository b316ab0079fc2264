"""What a local user, a signal burst or a bad file does to tierd: it keeps running.

Each test reproduces one finding of issue 23 (the HTTP port, signals, config
files, recording, simulate, and the smaller ones) on the host.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import http.client
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tierd import cli
from tierd.collectors import registry
from tierd.collectors.collector import Collector, Setup
from tierd.collectors.damon import DamonCollector
from tierd.collectors.evidence import Evidence, IdleScan, RegionBatch, SampleBatch
from tierd.config import Config, ReloadStatus, parse
from tierd.daemon import Daemon, IntervalSummary
from tierd.errors import Unusable
from tierd.heat import HeatModel
from tierd.kernel import damon_sysfs
from tierd.kernel.root import HostRoot
from tierd.pipeline import _open_collectors
from tierd.policy import Plan
from tierd.service import metrics
from tierd.service.metrics import MetricsServer
from tierd.service.signals import Signals
from tierd.telemetry import DaemonState
from tierd.trace import IntervalRecord, TraceError, TraceWriter, read_trace
from tierd.vocabulary import PAGE_SIZE, Health, NodeFacts, State

# --- 1. the HTTP port ----------------------------------------------------------------------


def ok_reload() -> ReloadStatus:
    return ReloadStatus(True, time.time(), None)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[MetricsServer]:
    monkeypatch.setattr(metrics, "REQUEST_SECONDS", 1.0)
    monkeypatch.setattr(metrics._Handler, "timeout", 1.0)
    srv = MetricsServer(DaemonState(), ok_reload, lambda: 5.0, port=0).start()
    try:
        yield srv
    finally:
        srv.stop()


def _request(srv: MetricsServer, method: str, path: str = "/metrics",
             host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=host is not None)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_only_get_and_head_are_answered(server: MetricsServer) -> None:
    for method in ("POST", "DELETE", "PUT", "OPTIONS"):
        status, headers, _ = _request(server, method)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    status, headers, body = _request(server, "HEAD", "/status.json")
    assert status == 200 and int(headers["Content-Length"]) > 0 and body == b""
    assert _request(server, "GET")[0] == 200


def test_a_host_header_naming_another_host_is_refused(server: MetricsServer) -> None:
    """DNS rebinding: a page of attacker.example re-pointed at 127.0.0.1."""
    assert _request(server, "GET", "/status.json", f"attacker.example:{server.port}")[0] == 421
    assert _request(server, "GET", "/status.json", "attacker.example")[0] == 421
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", "localhost",
                 "127.0.0.1"):
        assert _request(server, "GET", "/status.json", host)[0] == 200, host


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Does the server close `sock` within `seconds` (reading whatever it sends)?"""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except OSError:
        return True
    return False


@pytest.mark.parametrize("opening", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                                     b"GET /", b"GET /metrics HTTP/1.1\r\nHost: x"])
def test_a_request_that_never_ends_is_cut_at_the_deadline(server: MetricsServer,
                                                           opening: bytes) -> None:
    """A TLS ClientHello, an unfinished HTTP/0.9 line, headers without their end."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(opening)
        assert _closed_within(sock, 5.0)
    assert _request(server, "GET")[0] == 200


def test_a_trickling_client_is_cut_at_the_deadline(server: MetricsServer) -> None:
    """One header byte every half second keeps each read short of the socket timeout."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - started < 5:
                sock.sendall(b"X")
                time.sleep(0.5)
        assert time.monotonic() - started < 4


def test_request_headers_are_size_limited(server: MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n")
        sock.settimeout(5)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.0 431") or answer.startswith(b"HTTP/1.1 431"), answer[:40]


def test_connections_over_the_cap_are_closed_at_once(server: MetricsServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port))
            for _ in range(metrics.MAX_CONNECTIONS + 20)]
    try:
        time.sleep(0.3)
        closed = [s for s in idle if _closed_within(s, 0.05)]
        assert len(closed) >= 20
    finally:
        for s in idle:
            s.close()
    # The held ones reach their deadline; the port answers again.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if _request(server, "GET")[0] == 200:
                return
        time.sleep(0.2)
    pytest.fail("the port did not answer after the idle clients were cut")


def test_a_failing_stage_is_counted_and_the_next_interval_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = Daemon(parse(b"interval: 0.1\n"))
    daemon.topology = None  # type: ignore[assignment]  # never started: no pipeline
    monkeypatch.setattr("tierd.daemon.refresh_topology", lambda _previous, _root: None)
    monkeypatch.setattr("tierd.daemon.node_facts", lambda _topology: [])
    calls = []

    def collect() -> object:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(24, "Too many open files", "/proc/zoneinfo")
        return object()

    daemon.collect = collect  # type: ignore[method-assign,assignment]
    daemon.update_heat = lambda _evidence: None  # type: ignore[method-assign]
    daemon.refresh_mover = lambda: None  # type: ignore[method-assign]
    daemon.decide = lambda _facts: Plan([], 0)  # type: ignore[method-assign]
    daemon.publish = lambda _f, _s: daemon.state.finish_interval()  # type: ignore[method-assign]
    seen: list[str | None] = []

    def on_interval(_summary: IntervalSummary) -> None:
        seen.append(daemon.state.snapshot().failing)

    daemon.run(on_interval=on_interval, wait=lambda _s: len(seen) >= 2)
    assert seen[0] == "collect: OSError: [Errno 24] Too many open files: '/proc/zoneinfo'"
    assert seen[1] is None  # the next interval ran and completed
    snap = daemon.state.snapshot()
    assert snap.errors == {"collect": 1} and snap.intervals == 1
    assert snap.last_errors[-1].source == "stage:collect"


# The interval lines these tests count are DEBUG lines.
TIERD_DEBUG = [sys.executable, "-m", "tierd", "--log-level", "debug"]


# --- tierd run as a process ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    log: Path
    port: int
    config: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, words: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while words not in self.text():
            assert self.process.poll() is None, f"tierd exited: {self.text()[-2000:]}"
            assert time.monotonic() < deadline, f"no {words!r} in: {self.text()[-2000:]}"
            time.sleep(0.1)

    def intervals(self) -> int:
        return self.text().count(": nothing moved") + self.text().count("would ")

    def scrape(self, path: str = "/metrics") -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return bytes(r.read())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers: no test leaves a tierd holding the lock."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def tierd_process(tmp_path: Path, config_text: str, *args: str, name: str = "tierd",
                  port: int = 0, prefix: tuple[str, ...] = ()) -> Iterator[Running]:
    """`tierd run --config` (DEBUG log to a file) with `args`; stopped however the test ends."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(config_text)
    log = tmp_path / f"{name}.log"
    with log.open("wb") as err:
        process = subprocess.Popen([*prefix, *TIERD_DEBUG, "run", "--config", str(config), *args],
                                   stdout=subprocess.DEVNULL, stderr=err)
    running = Running(process, log, port, config)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def tierd_run(tmp_path: Path) -> Iterator[Running]:
    """`tierd run --dry-run` on this host, interval 0.5 s, metrics on a free port."""
    port = _free_port()
    config = (f"interval: 0.5\nmetrics: {{port: {port}}}\n"
              "collectors: {idle: {interval: 1}}\n")
    with tierd_process(tmp_path, config, "--dry-run", port=port,
                       prefix=("prlimit", "--nofile=64:64")) as running:
        running.wait_for("metrics on")
        yield running


def test_idle_connections_past_the_fd_limit_do_not_stop_the_daemon(tierd_run: Running) -> None:
    """The issue's reproduction: nofile 64, 90 idle connections; it used to exit in ~10 s."""
    held = []
    try:
        for _ in range(90):
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", tierd_run.port), timeout=5))
        before = tierd_run.intervals()
        deadline = time.monotonic() + 60
        while tierd_run.intervals() < before + 6:
            assert tierd_run.process.poll() is None, tierd_run.text()[-2000:]
            assert time.monotonic() < deadline, "no interval completed"
            time.sleep(0.2)
    finally:
        for s in held:
            s.close()
    time.sleep(metrics.REQUEST_SECONDS + 1)
    assert b"tierd_intervals_total" in tierd_run.scrape()
    assert tierd_run.process.poll() is None


# --- 2. signals -------------------------------------------------------------------------------


def test_signal_handlers_only_note_the_signal_and_bursts_coalesce() -> None:
    stop = threading.Event()
    signals = Signals(stop)
    for _ in range(20):
        signals.note(signal.SIGHUP)
    signals.note(signal.SIGUSR1)
    assert signals.wake.is_set() and not stop.is_set()
    assert signals.take() == {signal.SIGHUP, signal.SIGUSR1}
    assert signals.take() == set() and not signals.wake.is_set()
    signals.note(signal.SIGTERM)
    assert stop.is_set() and signals.take() == {signal.SIGTERM}


def test_a_burst_of_sighups_reloads_and_the_loop_keeps_going(tierd_run: Running) -> None:
    """20 SIGHUPs 2 ms apart used to deadlock the loop (reload inside the handler)."""
    for _ in range(20):
        tierd_run.process.send_signal(signal.SIGHUP)
        time.sleep(0.002)
    tierd_run.wait_for("config reloaded")
    before = tierd_run.intervals()
    deadline = time.monotonic() + 30
    while tierd_run.intervals() < before + 4:
        assert time.monotonic() < deadline, tierd_run.text()[-3000:]
        time.sleep(0.1)
    assert tierd_run.text().count("config reloaded") <= 20
    tierd_run.process.send_signal(signal.SIGTERM)
    assert tierd_run.process.wait(30) == 0


def test_sigusr1_and_sigusr2_are_logged_and_ignored(tierd_run: Running) -> None:
    tierd_run.process.send_signal(signal.SIGUSR1)
    tierd_run.process.send_signal(signal.SIGUSR2)
    tierd_run.wait_for("SIGUSR1 ignored")
    tierd_run.wait_for("SIGUSR2 ignored")
    time.sleep(1)
    assert tierd_run.process.poll() is None
    tierd_run.process.send_signal(signal.SIGTERM)
    assert tierd_run.process.wait(30) == 0


def test_a_bad_file_on_sighup_is_refused_and_the_old_config_kept(tierd_run: Running) -> None:
    tierd_run.config.write_text("1: 2\nfoo: 3\n")
    tierd_run.process.send_signal(signal.SIGHUP)
    tierd_run.wait_for("config reload failed, keeping the running config")
    fifo = tierd_run.config.parent / "fifo.yaml"
    os.mkfifo(fifo)
    tierd_run.config.unlink()
    tierd_run.config.symlink_to(fifo)
    tierd_run.process.send_signal(signal.SIGHUP)
    tierd_run.wait_for("not a regular file")
    assert tierd_run.process.poll() is None
    tierd_run.process.send_signal(signal.SIGTERM)
    assert tierd_run.process.wait(30) == 0




# --- 6. recording -------------------------------------------------------------------------


def _interval(npfns: int = 64) -> IntervalRecord:
    nodes = [NodeFacts(0, 0, ((0, npfns // 2),), 32, 10, 1),
             NodeFacts(1, 1, ((npfns // 2, npfns),), 32, 20, 1)]
    return IntervalRecord(npfns, 4096, 1.0, 100, nodes,
                          idle=[IdleScan(0, np.full(npfns, 3, dtype=np.uint8), 0.0)],
                          samples=[SampleBatch(np.array([40, 41], dtype=np.uint64), 0, 0, 0.0)],
                          regions=[RegionBatch(np.array([0], dtype=np.uint64),
                                               np.array([4], dtype=np.uint64),
                                               np.array([3], dtype=np.uint32),
                                               np.array([1], dtype=np.uint32), 20, 0.0)])


def test_recording_replaces_a_planted_symlink_and_never_writes_its_target(
        tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    link = tmp_path / "trace"
    link.symlink_to(target)
    with pytest.raises(TraceError, match="not a regular file"):
        TraceWriter(link)
    assert target.read_text() == "precious\n" and link.is_symlink()


def test_recording_over_another_users_file_makes_a_new_0600_file(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    trace.write_text("old\n")
    trace.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(trace, 65534, 65534)
    os.chmod(tmp_path, 0o755)
    writer = TraceWriter(trace)
    writer.write(_interval())
    writer.close()
    st = trace.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    assert len(list(read_trace(trace))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace"]  # no temporary left


def test_each_interval_is_readable_before_the_trace_is_closed(tmp_path: Path) -> None:
    """As after a SIGKILL: the file as it is after the third interval, never closed."""
    writer = TraceWriter(tmp_path / "trace")
    for _ in range(3):
        writer.write(_interval())
    copy = tmp_path / "copy"
    copy.write_bytes((tmp_path / "trace").read_bytes())
    writer.close()
    assert len(list(read_trace(copy))) == 3


def test_a_missing_directory_or_a_full_disk_turns_recording_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TraceError, match="no-such-dir/trace: cannot record"):
        TraceWriter(tmp_path / "no-such-dir" / "trace")
    daemon = Daemon(Config())
    monkeypatch.setattr(Daemon, "heat", HeatModel(64))
    daemon._trace = TraceWriter(tmp_path / "trace")

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("zipfile.ZipFile.writestr", full)
    daemon._record([], Evidence())
    assert daemon._trace is None
    assert "recording off" in daemon.state.snapshot().last_errors[-1].message


def test_run_records_to_a_missing_directory_and_keeps_running(tmp_path: Path) -> None:
    config = tmp_path / "tierd.yaml"
    config.write_text("interval: 0.2\nmetrics: {enabled: false}\n")
    done = subprocess.run([*TIERD_DEBUG, "run", "--once", "--dry-run",
                           "--config", str(config), "--record", str(tmp_path / "x" / "t")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "recording off" in done.stderr and "Traceback" not in done.stderr


def test_a_sigkilled_recording_daemon_leaves_a_readable_trace(tmp_path: Path) -> None:
    config = "interval: 0.2\nmetrics: {enabled: false}\n"
    with tierd_process(tmp_path, config, "--dry-run", "--record", str(tmp_path / "t")) as running:
        deadline = time.monotonic() + 60
        while running.text().count("interval ") < 4:
            assert time.monotonic() < deadline and running.process.poll() is None, running.text()
            time.sleep(0.1)
        running.process.kill()
        running.process.wait()
    assert len(list(read_trace(tmp_path / "t"))) >= 3


# --- 7. simulate -----------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _good_meta(npfns: int = 64) -> dict[str, Any]:
    return {"version": 1, "npfns": npfns, "page_size": 4096, "interval_seconds": 1.0,
            "budget_pages": 100,
            "nodes": [{"node": 0, "tier": 0, "ranges": [[0, npfns // 2]], "managed_pages": 32,
                       "free_pages": 10, "watermark_pages": 1},
                      {"node": 1, "tier": 1, "ranges": [[npfns // 2, npfns]],
                       "managed_pages": 32, "free_pages": 20, "watermark_pages": 1}],
            "idle": [{"pfn_start": 0, "scanned_at": 0.0}],
            "samples": [{"lost": 0, "unresolved": 0, "collected_at": 0.0}],
            "regions": [{"max_nr_accesses": 20, "collected_at": 0.0}]}


def _good_entries(npfns: int = 64) -> dict[str, bytes]:
    return {"idle0.npy": _npy_bytes(np.full(npfns, 3, dtype=np.uint8)),
            "samples0.npy": _npy_bytes(np.array([40, 41], dtype=np.uint64)),
            "regions0.npz": _npz_bytes(pfn_start=np.array([0], dtype=np.uint64),
                                       pfn_end=np.array([4], dtype=np.uint64),
                                       nr_accesses=np.array([3], dtype=np.uint32),
                                       age=np.array([1], dtype=np.uint32))}


def _meta(**changes: Any) -> Callable[[dict[str, Any], dict[str, bytes]], None]:
    def change(meta: dict[str, Any], _entries: dict[str, bytes]) -> None:
        meta.update(changes)
    return change


def _node(**changes: Any) -> Callable[[dict[str, Any], dict[str, bytes]], None]:
    def change(meta: dict[str, Any], _entries: dict[str, bytes]) -> None:
        meta["nodes"][0].update(changes)
    return change


def _item(key: str, **changes: Any) -> Callable[[dict[str, Any], dict[str, bytes]], None]:
    def change(meta: dict[str, Any], _entries: dict[str, bytes]) -> None:
        meta[key][0].update(changes)
    return change


def _entry(name: str, data: bytes) -> Callable[[dict[str, Any], dict[str, bytes]], None]:
    def change(_meta: dict[str, Any], entries: dict[str, bytes]) -> None:
        entries[name] = data
    return change


def _drop(name: str) -> Callable[[dict[str, Any], dict[str, bytes]], None]:
    def change(_meta: dict[str, Any], entries: dict[str, bytes]) -> None:
        del entries[name]
    return change


def _claiming(elements: int) -> bytes:
    """A .npy whose header claims `elements` uint8 items, followed by 16 bytes."""
    header = {"descr": "|u1", "fortran_order": False, "shape": (elements,)}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(16)


def _regions(n: int, start: int, end: int, **arrays: np.ndarray) -> bytes:
    base = {"pfn_start": np.full(n, start, dtype=np.uint64),
            "pfn_end": np.full(n, end, dtype=np.uint64),
            "nr_accesses": np.full(n, 5, dtype=np.uint32), "age": np.ones(n, dtype=np.uint32)}
    return _npz_bytes(**{**base, **arrays})


HOSTILE_TRACES: list[tuple[str, Callable[[dict[str, Any], dict[str, bytes]], None]]] = [
    ("npfns negative", _meta(npfns=-5)),
    ("npfns 2^40", _meta(npfns=1 << 40)),
    ("npfns a string", _meta(npfns="64")),
    ("npfns a float", _meta(npfns=64.5)),
    ("npfns missing", _meta(npfns=None)),
    ("page_size 0", _meta(page_size=0)),
    ("page_size negative", _meta(page_size=-4096)),
    ("page_size not a power of two", _meta(page_size=3000)),
    ("page_size 2^40", _meta(page_size=1 << 40)),
    ("interval NaN", _meta(interval_seconds=float("nan"))),
    ("interval negative", _meta(interval_seconds=-1)),
    ("budget negative", _meta(budget_pages=-1)),
    ("version 2", _meta(version=2)),
    ("nodes not a list", _meta(nodes={"a": 1})),
    ("node range past npfns", _node(ranges=[[0, 1 << 40]])),
    ("node range reversed", _node(ranges=[[30, 2]])),
    ("node range not a pair", _node(ranges=[[1, 2, 3]])),
    ("node count a string", _node(managed_pages="many")),
    ("idle pfn_start negative", _item("idle", pfn_start=-1)),
    ("idle past npfns", _item("idle", pfn_start=10)),
    ("idle entry missing", _drop("idle0.npy")),
    ("idle header claims 2^40 elements", _entry("idle0.npy", _claiming(1 << 40))),
    ("idle header claims more than held", _entry("idle0.npy", _claiming(48))),
    ("idle two-dimensional", _entry("idle0.npy", _npy_bytes(np.zeros((8, 8), np.uint8)))),
    ("idle not npy", _entry("idle0.npy", b"\x93NUMPY garbage")),
    ("idle structured dtype", _entry("idle0.npy", _npy_bytes(
        np.zeros(64, dtype=[("a", "u1")])))),
    ("samples past npfns", _entry("samples0.npy", _npy_bytes(np.array([1 << 40])))),
    ("samples negative", _entry("samples0.npy", _npy_bytes(np.array([-1, 3])))),
    ("samples NaN", _entry("samples0.npy", _npy_bytes(np.array([np.nan])))),
    ("samples lost negative", _item("samples", lost=-3)),
    ("regions mismatched arrays", _entry("regions0.npz", _regions(
        3, 0, 4, age=np.ones(2, dtype=np.uint32)))),
    ("regions end before start", _entry("regions0.npz", _regions(1, 10, 2))),
    ("2000 full-range regions", _entry("regions0.npz", _regions(2000, 0, 64))),
    ("regions not a zip", _entry("regions0.npz", b"PK\x03\x04 nope")),
    ("regions key missing", _entry("regions0.npz", _npz_bytes(
        pfn_start=np.zeros(1, np.uint64)))),
    ("max_nr_accesses negative", _item("regions", max_nr_accesses=-1)),
    ("meta without a version", lambda meta, _e: (meta.clear(), meta.update({"not": "meta"}))),
    ("meta missing", _entry("meta.json", b"")),
]


def _write_trace(path: Path, meta: dict[str, Any] | bytes, entries: dict[str, bytes],
                 bombs: dict[str, int] | None = None) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("000001/meta.json", meta if isinstance(meta, bytes) else json.dumps(meta))
        for name, data in entries.items():
            zf.writestr(f"000001/{name}", data)
        for name, size in (bombs or {}).items():
            with zf.open(f"000001/{name}", "w", force_zip64=True) as f:
                block = bytes(1 << 20)
                for _ in range(size >> 20):
                    f.write(block)


def _simulate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(["simulate", str(path)])
    return rc, capsys.readouterr().err


def test_a_good_hand_built_trace_replays(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _write_trace(tmp_path / "t", _good_meta(), _good_entries())
    assert _simulate(tmp_path / "t", capsys)[0] == 0


@pytest.mark.parametrize("change", [c for _, c in HOSTILE_TRACES],
                         ids=[name for name, _ in HOSTILE_TRACES])
def test_a_hostile_trace_is_refused_with_exit_65(
        change: Callable[[dict[str, Any], dict[str, bytes]], None], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    meta, entries = _good_meta(), _good_entries()
    change(meta, entries)
    meta_bytes = json.dumps(meta).encode()
    if "meta.json" in entries:  # a case replacing or dropping meta.json itself
        meta_bytes = entries.pop("meta.json")
    _write_trace(tmp_path / "t", meta_bytes, entries)
    if not meta_bytes:
        with zipfile.ZipFile(tmp_path / "t", "w") as zf:
            zf.writestr("000001/idle0.npy", entries.get("idle0.npy", b""))
    rc, err = _simulate(tmp_path / "t", capsys)
    assert rc == 65, err
    assert err.startswith(f"tierd: {tmp_path / 't'}") and "Traceback" not in err
    assert len(err) < 1000


@pytest.mark.parametrize("meta_bytes", [b"{not json", b"[" * 100_000, b"[1, 2]"],
                         ids=["invalid", "deep", "a list"])
def test_a_hostile_meta_json_is_refused(meta_bytes: bytes, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _write_trace(tmp_path / "t", meta_bytes, _good_entries())
    assert _simulate(tmp_path / "t", capsys)[0] == 65


@pytest.mark.parametrize("entry", ["idle0.npy", "samples0.npy", "regions0.npz"])
def test_a_zip_bomb_entry_is_refused_before_it_is_inflated(
        entry: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entries = _good_entries()
    del entries[entry]
    _write_trace(tmp_path / "t", _good_meta(), entries, bombs={entry: 64 << 20})
    assert (tmp_path / "t").stat().st_size < 1 << 20
    with pytest.raises(TraceError, match="over the memory budget"):
        list(read_trace(tmp_path / "t", budget=32 << 20))


def test_a_trace_over_the_memory_budget_is_refused(tmp_path: Path) -> None:
    _write_trace(tmp_path / "t", _good_meta(1 << 20), _good_entries(1 << 20))
    with pytest.raises(TraceError, match=r"npfns must be an integer in \[0, 65536\]"):
        list(read_trace(tmp_path / "t", budget=1 << 20))


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir", "empty", "junk"])
def test_a_trace_that_is_not_a_zip_file_is_refused(
        special: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(special) if special.startswith("/") else tmp_path / special
    if special == "fifo":
        os.mkfifo(path)
    elif special == "dir":
        path.mkdir()
    elif special == "empty":
        path.write_bytes(b"")
    elif special == "junk":
        path.write_bytes(b"PK" + bytes(100))
    rc, err = _simulate(path, capsys)
    assert rc == 65 and "not a tierd trace" in err, err


# --- 8. the smaller ones ---------------------------------------------------------------------


def _caps(status: str, field: str) -> int:
    line = next(x for x in status.splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1], 16)


def _effective_caps(pid: int) -> dict[int, int]:
    """CapEff of each of pid's threads; a thread that ends while listed is left out."""
    effective = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            effective[int(task.name)] = _caps((task / "status").read_text(), "CapEff")
        except (FileNotFoundError, ProcessLookupError):
            continue  # a connection thread that answered and ended
    return effective


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root's capabilities to drop them")
def test_tierd_run_keeps_only_the_movers_capabilities_and_http_has_none(
        tierd_run: Running) -> None:
    from tierd.kernel.capabilities import KEPT
    kept = sum(1 << c for c in KEPT) & _caps(Path("/proc/self/status").read_text(), "CapEff")
    pid = tierd_run.process.pid
    if Path(f"/proc/{pid}/comm").read_text().strip() == "prlimit":
        pytest.skip("prlimit did not exec")
    effective = _effective_caps(pid)
    bounding = _caps(Path(f"/proc/{pid}/status").read_text(), "CapBnd")
    assert effective[pid] == kept and bounding & ~kept == 0
    assert all(e & ~kept == 0 for e in effective.values())
    assert tierd_run.scrape()  # the HTTP thread answered, so it runs by now
    assert 0 in _effective_caps(pid).values()


def test_damon_enabled_false_means_no_damon_even_without_other_collectors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[Config] = []

    def fake_damon(config: Config, _setup: Setup) -> Collector:
        started.append(config)
        raise Unusable(Health(State.DISABLED, "not here"))

    monkeypatch.setitem(registry.COLLECTORS, "damon",
                        dataclasses.replace(registry.COLLECTORS["damon"], open=fake_damon))
    setup = Setup(HostRoot("/nonexistent"), None, None, 1.0)  # type: ignore[arg-type]
    others_off = b"collectors: {idle: {enabled: false}, perf: {enabled: false}, damon: "
    assert _open_collectors(parse(others_off + b"{enabled: false}}\n"), setup,
                            contextlib.ExitStack()) == ([], {})
    assert not started
    _open_collectors(parse(others_off + b"{enabled: auto}}\n"), setup, contextlib.ExitStack())
    assert len(started) == 1  # auto: the fallback
    assert parse(b"{}").collectors.damon.enabled == "auto"  # the fallback stays the default


def test_a_refused_damon_region_write_does_not_show_the_address(tmp_path: Path) -> None:
    from tierd.kernel.damon_sysfs import DamonError, _write
    (tmp_path / "start").symlink_to("/dev/full")  # the write fails with ENOSPC
    with pytest.raises(DamonError) as refused:
        _write(HostRoot(tmp_path), "/start", 0x1_2345_6000, secret=True)
    assert "12345" not in str(refused.value) and str(0x1_2345_6000) not in str(refused.value)
    assert "refused the value" in str(refused.value)


class _Fake(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[_Fake]]]:
    handler = type("Handler", (_Fake,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("body", [b"<html>hello</html>", b"[1, 2]", b"{\"version\": 1}",
                                  b"[" * 100_000])
def test_tierd_status_at_a_server_that_is_not_tierd_is_a_clear_error(
        body: bytes, fake_server: tuple[str, type[_Fake]],
        capsys: pytest.CaptureFixture[str]) -> None:
    url, handler = fake_server
    handler.body = body
    assert cli.main(["status", "--url", url]) == 3
    err = capsys.readouterr().err
    assert "not a" in err and "status document" in err and "Traceback" not in err


def test_tierd_status_of_a_document_with_wrong_types_is_a_clear_error(
        fake_server: tuple[str, type[_Fake]], capsys: pytest.CaptureFixture[str]) -> None:
    url, handler = fake_server
    handler.body = json.dumps({k: 1 for k in ("version", "uptime_seconds", "intervals",
                                              "nodes", "moves", "collectors", "last_errors",
                                              "config")}).encode()
    assert cli.main(["status", "--url", url]) == 3
    assert "not a tierd status document" in capsys.readouterr().err


def test_tierd_status_passes_no_terminal_escape_through(
        capsys: pytest.CaptureFixture[str]) -> None:
    state = DaemonState()
    state.set_collector("idle", Health(State.DEGRADED, "\x1b]0;owned\x07\x1b[2J\x9b31m bad"))
    state.record_error("config", "\x1b[31mred\x1b[0m")
    srv = MetricsServer(state, ok_reload, lambda: 5.0, port=0).start()
    try:
        for extra in ([], ["--json"]):
            assert cli.main(["status", "--url", srv.url, *extra]) == 0
            out = capsys.readouterr().out
            assert "bad" in out or "\\u" in out
            assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    finally:
        srv.stop()


# --- 5. a kdamond left running by a killed tierd ----------------------------------------------

DAMON_FIXTURES = Path(__file__).parent / "fixtures" / "damon"
RANGES = [(0x100, 1 << 18), (1 << 18, 1 << 19)]


def _damon_tree(tmp_path: Path, name: str) -> HostRoot:
    shutil.copytree(DAMON_FIXTURES / name, tmp_path / name)
    return HostRoot(tmp_path / name)


def _kdamond(root: HostRoot, leaf: str) -> Path:
    return root(f"{damon_sysfs.KDAMONDS}/0/{leaf}")


def test_a_restarted_tierd_stops_the_kdamond_a_killed_one_left(tmp_path: Path) -> None:
    root = _damon_tree(tmp_path, "two-nodes")
    killed = DamonCollector(RANGES, root=root)
    _kdamond(root, "pid").write_text("4242\n")  # what the kernel shows once it is on
    assert killed.start()
    atexit.unregister(killed.stop)  # SIGKILL: no stop, no atexit
    assert root(damon_sysfs.LEDGER).read_text() == "4242\n"
    assert damon_sysfs.availability(root) is not None  # busy, as the issue found it
    restarted = DamonCollector(RANGES, root=root)
    assert restarted.start(), restarted.health.reason
    assert restarted.health.state is State.OK
    restarted.stop()
    assert not root(damon_sysfs.LEDGER).exists()


def test_someone_elses_kdamond_is_not_reclaimed(tmp_path: Path) -> None:
    root = _damon_tree(tmp_path, "busy")
    root(damon_sysfs.LEDGER).parent.mkdir(parents=True)
    root(damon_sysfs.LEDGER).write_text("4242\n")  # tierd's noted pid; this one is 77
    collector = DamonCollector(RANGES, root=root)
    assert not collector.start() and "busy" in collector.health.reason
    assert _kdamond(root, "state").read_text().strip() == "on"


# --- 4. long work feeds the watchdog and stops at a SIGTERM (host side; the lab test is in
# test_systemd.py) --------------------------------------------------------------------------


def test_a_paced_scan_checks_in_between_chunks_and_a_stop_ends_it(tmp_path: Path) -> None:
    from test_idle import LRU_ANON, FakeKernel

    from tierd.errors import Interrupted
    k = FakeKernel(tmp_path)
    k.set_flags(200, 300, LRU_ANON)
    k.set_flags(2048, 2100, LRU_ANON)
    beats = []
    stop_after = 3

    def checkpoint() -> None:
        beats.append(1)
        if len(beats) >= stop_after:
            raise Interrupted("stopping")

    c = k.collector(chunk_pfns=512, checkpoint=checkpoint)
    with pytest.raises(Interrupted):
        c.mark()  # a full scan: many chunks, each checked in
    assert len(beats) == stop_after


def test_the_daemons_pacing_sleep_feeds_the_watchdog_and_ends_at_a_stop() -> None:
    from tierd.errors import Interrupted
    daemon = Daemon(Config())
    beats: list[float] = []
    daemon.heartbeat = lambda: beats.append(time.monotonic())
    daemon._pause(2.5)
    assert len(beats) >= 2  # about one a second, however long the sleep
    threading.Timer(0.5, daemon.stop_event.set).start()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        daemon._pause(3600)
    assert time.monotonic() - started < 60


def test_keepalive_extends_the_start_then_feeds_the_watchdog(tmp_path: Path) -> None:
    from tierd.service.systemd import Notifier
    sent: list[str] = []
    notifier = Notifier(lambda m: sent.append(m) or True, {"WATCHDOG_USEC": "8000000"})
    assert notifier.keepalive() and sent[-1].startswith("EXTEND_TIMEOUT_USEC=")
    assert not notifier.keepalive()  # throttled: at most one per few seconds
    notifier.ready("up")
    notifier._last_keepalive -= 10
    assert notifier.keepalive() and sent[-1] == "WATCHDOG=1"


@pytest.mark.vm(kernels=["stock"])
def test_a_restarted_tierd_reclaims_the_kdamond_a_sigkilled_one_left(tmp_path: Path) -> None:
    """On the stock kernel DAMON is the only collector: a restart must not come back blind."""
    config = ("interval: 1\nmetrics: {enabled: false}\ncollectors: {idle: "
              "{enabled: false}, perf: {enabled: false}, damon: {enabled: true,"
              " operations: paddr}}\n")
    try:
        with tierd_process(tmp_path, config, "--dry-run", name="first") as first:
            first.wait_for("interval 1:", timeout=300)
            running = damon_sysfs.running_kdamonds()
            assert running, first.text()
            left = [damon_sysfs.pid_of(index=i) for i in running]
            first.process.kill()
            first.process.wait()
        assert damon_sysfs.running_kdamonds() == running  # what the issue found
        with tierd_process(tmp_path, config, "--dry-run", name="second") as second:
            second.wait_for("interval 1:", timeout=300)
            assert "busy" not in second.text()
            assert "stopped 1 kdamond(s) a previous tierd left" in second.text()
            now = [damon_sysfs.pid_of(index=i) for i in damon_sysfs.running_kdamonds()]
            assert now and not set(now) & set(left)
            second.process.send_signal(signal.SIGTERM)
            assert second.process.wait(120) == 0
        assert damon_sysfs.running_kdamonds() == []
    finally:
        if damon_sysfs.running_kdamonds():
            damon_sysfs.Kdamond().release()


def test_a_restarted_tierd_takes_back_the_heat_it_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 8: heat started from nothing after every restart."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    config = "interval: 0.2\nmetrics: {enabled: false}\n"
    with tierd_process(tmp_path, config, "--dry-run", name="first") as first:
        first.wait_for("interval 2:")
        first.stop()
    assert first.process.returncode == 0, first.text()
    assert "for the next start" in first.text() and (tmp_path / "heat").exists()
    with tierd_process(tmp_path, config, "--dry-run", name="second") as second:
        second.wait_for("interval 1:")
        assert "heat taken from the last run" in second.text()
        assert not (tmp_path / "heat").exists()


# --- 8. no physical address in metrics, status or the default log (a lab run) ---------------

HEX = re.compile(r"0x[0-9a-fA-F]{5,}")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.mark.vm
def test_no_physical_address_in_metrics_status_or_log(tmp_path: Path) -> None:
    from tierd.collectors.topology import read_topology
    port = _free_port()
    config = f"interval: 1\nmetrics: {{port: {port}}}\ncollectors: {{idle: {{interval: 2}}}}\n"
    with tierd_process(tmp_path, config, port=port) as running:
        running.wait_for("interval 6:", timeout=600)
        labels = [line.split("{", 1)[1].rsplit("}", 1)[0]
                  for line in running.scrape().decode().splitlines()
                  if "{" in line and not line.startswith("#")]
        status = list(_strings(json.loads(running.scrape("/status.json"))))
    texts = [*labels, *status, *running.text().splitlines()]
    boundaries = {b for start, end, _ in read_topology().pfn_ranges(None) for b in (start, end)}
    secrets = {str(n) for b in boundaries if b > 1 << 16 for n in (b, b * PAGE_SIZE)}
    leaks = [t for t in texts if HEX.search(t) or set(re.findall(r"\d+", t)) & secrets]
    assert not leaks, leaks[:5]
