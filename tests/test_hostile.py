"""What a local user, a signal burst or a bad file does to tierd: it keeps running.

Each test reproduces one finding of issue 23 (the HTTP port, signals, config
files, recording, simulate, and the smaller ones) on the host.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tierd.config import ReloadStatus, parse
from tierd.daemon import Daemon, IntervalSummary
from tierd.policy import Plan
from tierd.service import metrics
from tierd.service.metrics import MetricsServer
from tierd.service.signals import Signals
from tierd.state import DaemonState

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
    monkeypatch.setattr("tierd.daemon.read_topology", lambda _root: None)
    monkeypatch.setattr("tierd.daemon.node_facts", lambda _topology: [])
    calls = []

    def collect() -> object:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(24, "Too many open files", "/proc/zoneinfo")
        return object()

    daemon.collect = collect  # type: ignore[method-assign,assignment]
    daemon.update_heat = lambda _evidence: None  # type: ignore[method-assign]
    daemon.decide = lambda _facts: Plan([], 0)  # type: ignore[method-assign]
    daemon.publish = lambda _f, _s: daemon.state.finish_interval()  # type: ignore[method-assign]
    seen: list[str | None] = []

    def on_interval(_summary: IntervalSummary) -> None:
        seen.append(daemon.state.snapshot().failing)

    daemon.run(on_interval=on_interval, wait=lambda _s: len(seen) >= 2)
    assert seen[0] == "collect: OSError: [Errno 24] Too many open files: '/proc/zoneinfo'"
    assert seen[1] is None  # the next interval ran and completed
    snap = daemon.state.snapshot()
    assert snap.stage_errors == {"collect": 1} and snap.intervals == 1
    assert snap.last_errors[-1].source == "stage:collect"


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


@pytest.fixture
def tierd_run(tmp_path: Path) -> Iterator[Running]:
    """`tierd run --dry-run` on this host, interval 0.5 s, metrics on a free port."""
    port = _free_port()
    config = tmp_path / "tierd.yaml"
    config.write_text(f"interval: 0.5\nmetrics: {{port: {port}}}\n"
                      "collectors: {idle: {interval: 1}}\n")
    log = tmp_path / "tierd.log"
    with log.open("wb") as err:
        process = subprocess.Popen(
            ["prlimit", "--nofile=64:64", sys.executable, "-m", "tierd", "run", "--dry-run",
             "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err)
    running = Running(process, log, port, config)
    try:
        running.wait_for("metrics on")
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
    import threading
    stop = threading.Event()
    signals = Signals(stop)
    for _ in range(20):
        signals._on_signal(signal.SIGHUP, None)
    signals._on_signal(signal.SIGUSR1, None)
    assert signals.wake.is_set() and not stop.is_set()
    assert signals.take() == {signal.SIGHUP, signal.SIGUSR1}
    assert signals.take() == set() and not signals.wake.is_set()
    signals._on_signal(signal.SIGTERM, None)
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
        assert time.monotonic() < deadline, "the loop stopped after the SIGHUPs"
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


