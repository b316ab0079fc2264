"""systemd integration: sd_notify over real sockets, the unit file, and the service in the lab.

Host tests talk to a real AF_UNIX datagram socket standing in for systemd's
NOTIFY_SOCKET, and check tierd.service with the host's systemd-analyze. The
vm tests boot the lab guest with systemd as PID 1 and drive tierd.service
with systemctl (see test_service_* below).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierd.service import systemd as sd

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "tierd.service"
TIERD = Path(sys.executable).parent / "tierd"


class NotifySocket:
    """A bound AF_UNIX datagram socket: what systemd listens on for sd_notify."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def recv(self) -> str:
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        self.sock.setblocking(False)
        messages = []
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return messages
        finally:
            self.sock.settimeout(5)


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    address = str(tmp_path / "notify")
    listener = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield listener
    listener.sock.close()


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    name = f"tierd-test-{os.getpid()}-{threading.get_ident()}"
    listener = NotifySocket("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield listener
    listener.sock.close()


def senders() -> list:
    """The fallback always; systemd-python's notify where installed."""
    found = [pytest.param(sd.send_datagram, id="fallback")]
    if sd._sd_daemon is not None:
        found.append(pytest.param(sd._library_notify, id="systemd-python"))
    return found


@pytest.mark.parametrize("send", senders())
def test_notifier_messages_reach_a_path_socket(send, path_socket: NotifySocket) -> None:
    notifier = sd.Notifier(send)
    assert notifier.ready("mover pid,\n  moving pages")
    assert path_socket.recv() == "READY=1\nSTATUS=mover pid, moving pages"
    assert notifier.status("interval 3: nothing moved")
    assert path_socket.recv() == "STATUS=interval 3: nothing moved"
    assert notifier.reloading()
    assert re.fullmatch(r"RELOADING=1\nSTATUS=reloading configuration\nMONOTONIC_USEC=\d+",
                        path_socket.recv())
    assert notifier.reloaded("config reloaded")
    assert path_socket.recv() == "READY=1\nSTATUS=config reloaded"
    assert notifier.watchdog()
    assert path_socket.recv() == "WATCHDOG=1"
    assert notifier.stopping()
    assert path_socket.recv() == "STOPPING=1\nSTATUS=stopping"


@pytest.mark.parametrize("send", senders())
def test_notifier_reaches_an_abstract_socket(send, abstract_socket: NotifySocket) -> None:
    assert sd.Notifier(send).watchdog()
    assert abstract_socket.recv() == "WATCHDOG=1"


@pytest.mark.parametrize("send", senders())
def test_without_notify_socket_nothing_is_sent_and_nothing_raises(
    send, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd.Notifier(send).ready("x")


@pytest.mark.parametrize("send", senders())
def test_a_vanished_socket_is_not_an_error(send, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sd.Notifier(send).watchdog()


@pytest.mark.parametrize("value", ["", "relative/path", "@", "vsock:2:1234"])
def test_fallback_ignores_addresses_it_cannot_use(value: str) -> None:
    assert not sd.send_datagram("READY=1", {"NOTIFY_SOCKET": value})


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "junk"}, None),
    ({"WATCHDOG_USEC": "60000000"}, 60.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 60.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
])
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert sd.watchdog_interval(environ) == expected


def test_wait_feeds_the_watchdog_and_reports_a_stop(path_socket: NotifySocket) -> None:
    notifier = sd.Notifier(sd.send_datagram, {"WATCHDOG_USEC": "60000000"})
    stop = threading.Event()
    assert notifier.wait(stop, 0) is False
    assert set(path_socket.pending()) == {"WATCHDOG=1"}
    stop.set()
    assert notifier.wait(stop, 3600) is True
    assert path_socket.pending() == ["WATCHDOG=1"]


def test_priority_prefixes_for_journald_reading_stderr() -> None:
    formatter = sd.PriorityFormatter("%(message)s")
    record = logging.LogRecord("tierd", logging.ERROR, __file__, 1, "two\nlines", None, None)
    assert formatter.format(record) == "<3>two\n<3>lines"
    record.levelno = logging.DEBUG
    assert formatter.format(record) == "<7>two\n<7>lines"


def test_stderr_is_journal_compares_device_and_inode(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        st = os.fstat(stream.fileno())
        assert sd.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not sd.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not sd.stderr_is_journal({})
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        handler = sd.journal_handler()
        expected = "JournalHandler" if sd._sd_journal is not None else "StreamHandler"
        assert type(handler).__name__ == expected


def test_tierd_run_notifies_ready_status_watchdog_and_stopping(
    path_socket: NotifySocket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real daemon, one interval, on this host's kernel (whatever it can observe)."""
    config = tmp_path / "tierd.yaml"
    config.write_text("interval: 0.1\nmetrics:\n  enabled: false\n")
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    done = subprocess.run([str(TIERD), "run", "--once", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    messages = path_socket.pending()
    assert messages[0].startswith("READY=1\nSTATUS=mover ")
    assert messages[0].endswith(", metrics off")
    assert "WATCHDOG=1" in messages
    assert any(m.startswith("STATUS=interval 1: ") for m in messages)
    assert messages[-1] == "STOPPING=1\nSTATUS=stopping"


def test_tierd_run_with_a_bad_config_exits_78_without_ready(
    path_socket: NotifySocket, tmp_path: Path
) -> None:
    config = tmp_path / "tierd.yaml"
    config.write_text("interval: fast\n")
    done = subprocess.run([str(TIERD), "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 78
    assert f"{config}:1: interval:" in done.stderr
    assert path_socket.pending() == []


# --- the unit file ------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value assigned to it, in order (units repeat keys; configparser won't)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_is_a_notify_service_with_watchdog_and_no_restart_on_config_error() -> None:
    unit = unit_settings(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == ["/usr/bin/tierd run"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["78"]
    assert int(unit["WatchdogSec"][0].removesuffix("s")) >= 10


def test_unit_leaves_out_the_hardening_that_breaks_tierd() -> None:
    unit = unit_settings(UNIT.read_text())
    for breaking in ("ProtectKernelTunables", "ProtectKernelModules", "PrivateUsers",
                     "ProcSubset", "MemoryDenyWriteExecute", "ProtectProc"):
        assert breaking not in unit, breaking
    assert unit["ProtectSystem"] == ["strict"]
    assert set(unit["CapabilityBoundingSet"][0].split()) == {
        "CAP_SYS_ADMIN", "CAP_SYS_NICE", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH",
        "CAP_PERFMON", "CAP_BPF"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_syscall_filter_denies_none_of_the_syscalls_tierd_makes() -> None:
    """Expand the deny list with systemd's own group tables."""
    filters = unit_settings(UNIT.read_text())["SystemCallFilter"]
    assert all(f.startswith("~") for f in filters), "an allow list would kill move_phys_pages"
    denied: set[str] = set()
    for entry in " ".join(f.removeprefix("~") for f in filters).split():
        if entry.startswith("@"):
            listing = subprocess.run(["systemd-analyze", "syscall-filter", entry],
                                     capture_output=True, text=True, check=True).stdout
            denied |= {w for line in listing.splitlines()[2:]
                       if (w := line.strip()) and not w.startswith(("#", "@"))}
            denied |= {w for line in listing.splitlines()
                       if (w := line.strip()).startswith("@")}
        else:
            denied.add(entry)
    needed = {"move_pages", "migrate_pages", "mbind", "get_mempolicy", "set_mempolicy",
              "perf_event_open", "bpf", "ioctl", "mmap", "pread64", "pwrite64", "openat",
              "socket", "bind", "sendto", "kill", "clone", "clone3", "execve", "wait4"}
    assert "reboot" in denied and "init_module" in denied  # the expansion worked
    assert needed.isdisjoint(denied), needed & denied


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verify the unit as shipped. Its ExecStart is /usr/bin/tierd, which only a
    package install provides; where it is missing, that must be the only
    complaint, and the unit with ExecStart pointed at this checkout's tierd
    must verify clean. (The lab test after dpkg -i verifies the installed unit.)"""
    shipped = subprocess.run(["systemd-analyze", "verify", str(UNIT)],
                             capture_output=True, text=True, check=False)
    if Path("/usr/bin/tierd").exists():
        assert shipped.returncode == 0, shipped.stderr
    else:
        complaints = [line for line in shipped.stderr.splitlines() if line.strip()]
        assert complaints == [
            "tierd.service: Command /usr/bin/tierd is not executable: No such file or directory"
        ], shipped.stderr
    local = tmp_path / "tierd.service"
    local.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/tierd",
                                              f"ExecStart={TIERD}"))
    done = subprocess.run(["systemd-analyze", "verify", str(local)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
