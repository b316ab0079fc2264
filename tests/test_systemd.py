"""systemd integration: sd_notify over real sockets, the unit file, and the service in the lab.

Host tests talk to a real AF_UNIX datagram socket standing in for systemd's
NOTIFY_SOCKET, and check tierd.service with the host's systemd-analyze. The
vm tests boot the lab guest with systemd as PID 1 and drive tierd.service
with systemctl (see test_service_* below).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tierd.service import systemd as sd

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "tierd.service"
# The virtualenv's console script; in a package build, the one on PATH.
TIERD = Path(sys.executable).parent / "tierd"
TIERD = TIERD if TIERD.exists() else Path(shutil.which("tierd") or TIERD)


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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_install_doc_records_the_current_security_analysis() -> None:
    doc = (REPO / "docs/install.md").read_text()
    section = doc.split("### systemd-analyze security", 1)[1]
    recorded = section.split("```text\n", 1)[1].split("```", 1)[0].rstrip("\n")
    current = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, check=True).stdout
    assert recorded == "\n".join(line.rstrip() for line in current.rstrip("\n").splitlines())


# --- in the lab guest, with systemd as PID 1 ------------------------------------------

in_systemd_guest = pytest.mark.vm(kernels=["tierd"], init="systemd")
METRICS = "http://127.0.0.1:9748/metrics"
CONFIG = Path("/etc/tierd/tierd.yaml")
DROP_IN = Path("/run/systemd/system/tierd.service.d/lab-probe.conf")
PROBE_OUT = Path("/run/tierd-sandbox-probe.json")

# Run under tierd.service's own sandbox (a drop-in swaps only ExecStart): can
# it do what tierd does, and is what it must not do still denied?
SANDBOX_PROBE = r'''
import ctypes, errno, json, mmap, struct
import numpy as np
from tierd.kernel import move_phys
from tierd.kernel.numa import move_pages

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(nr, *args):
    return 0 if libc.syscall(nr, *args) >= 0 else ctypes.get_errno()

out = {}
# mseal(0, 0, 0) is 0 in 6.12, and bookworm's libseccomp has no name for it:
# it stands for every syscall systemd cannot name, move_phys_pages included.
out["unnamed_syscall"] = call(462, 0, 0, 0)
out["mount"] = call(165, None, None, None, 0, None)            # @mount: denied
out["process_vm_readv"] = call(310, 0, None, 0, None, 0, 0)    # denied by name
attr = ctypes.create_string_buffer(struct.pack("IIQ", 1, 128, 0), 128)  # software CPU clock
out["perf_event_open"] = call(298, attr, -1, 0, -1, 0)
bpf_attr = ctypes.create_string_buffer(struct.pack("IIII", 2, 4, 4, 1), 128)  # ARRAY map
out["bpf"] = call(321, 0, bpf_attr, 128)
buf = mmap.mmap(-1, mmap.PAGESIZE)
buf[0] = 1
view = np.frombuffer(buf, dtype=np.uint8)
address = np.array([view.ctypes.data], dtype=np.uint64)
out["move_pages"] = int(move_pages(0, address, np.ones(1))[0])
with open("/proc/self/pagemap", "rb") as f:
    f.seek(view.ctypes.data // mmap.PAGESIZE * 8)
    pfn = int.from_bytes(f.read(8), "little") & ((1 << 55) - 1)
out["pagemap_pfn"] = pfn
with open("/proc/kpageflags", "rb") as f:
    f.seek(pfn * 8)
    out["kpageflags"] = len(f.read(8))
try:
    with open("/sys/kernel/mm/page_idle/bitmap", "r+b") as f:
        f.write(bytes(8))  # no bits set: marks nothing idle, proves the file is writable
    out["page_idle_write"] = 0
except OSError as e:
    out["page_idle_write"] = e.errno
support = move_phys.probe()
out["move_phys_pages"] = str(support)
if support.usable:
    try:
        move_phys.move_phys_pages(np.array([pfn * mmap.PAGESIZE], dtype=np.uint64))
        out["move_phys_pages_call"] = 0
    except OSError as e:
        out["move_phys_pages_call"] = e.errno
print(json.dumps(out))
'''


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=300)


def unit(prop: str) -> str:
    return sh("systemctl", "show", "-p", prop, "--value", "tierd.service").stdout.strip()


def journal_since(cursor: str) -> str:
    return sh("journalctl", "-u", "tierd.service", "--no-pager", "-o", "cat",
              f"--after-cursor={cursor}").stdout


def journal_cursor() -> str:
    out = sh("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout
    return out.strip().rsplit("-- cursor: ", 1)[1]


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll `check()` until true; the lab runs under TCG, so timeouts are generous."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)


def metric(name: str) -> float:
    with urllib.request.urlopen(METRICS, timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in {METRICS}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tierd's .deb, built and installed with dpkg in this guest (a throwaway root)."""
    from test_packaging import lab_deb

    deb = lab_deb(tmp_path_factory)
    sh("dpkg", "-i", str(deb))
    return deb


@in_systemd_guest
def test_guest_runs_systemd_as_pid1() -> None:
    assert Path("/proc/1/comm").read_text().strip() == "systemd"
    assert sh("systemctl", "is-system-running", check=False).stdout.strip() in (
        "starting", "running", "degraded")


@in_systemd_guest
def test_deb_installs_an_enabled_unit_that_verifies(installed: Path) -> None:
    assert "install ok installed" in sh("dpkg", "-s", "tierd").stdout
    assert sh("systemctl", "is-enabled", "tierd").stdout.strip() == "enabled"
    assert unit("ActiveState") == "inactive"  # enabled, not started by the postinst
    verify = sh("systemd-analyze", "verify", "tierd.service", check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    assert unit("FragmentPath") == "/lib/systemd/system/tierd.service"


@in_systemd_guest
def test_sandbox_allows_what_tierd_does_and_denies_the_rest(installed: Path) -> None:
    probe = Path("/run/tierd-sandbox-probe.py")
    probe.write_text(SANDBOX_PROBE)
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text(
        "[Service]\nType=oneshot\nExecStart=\n"
        f"ExecStart=/usr/bin/python3 {probe}\nStandardOutput=file:{PROBE_OUT}\n"
        "WatchdogSec=0\nRestart=no\n")
    try:
        sh("systemctl", "daemon-reload")
        started = sh("systemctl", "start", "tierd.service", check=False)
        assert started.returncode == 0, started.stderr + sh(
            "journalctl", "-u", "tierd", "--no-pager", "-n", "30").stdout
        out = json.loads(PROBE_OUT.read_text())
    finally:
        DROP_IN.unlink()
        sh("systemctl", "daemon-reload")
    assert out["unnamed_syscall"] == 0, "a syscall systemd cannot name is blocked"
    assert out["mount"] == errno.EPERM
    assert out["process_vm_readv"] == errno.EPERM
    assert out["perf_event_open"] == 0
    assert out["bpf"] == 0
    assert out["move_pages"] == 1
    assert out["pagemap_pfn"] != 0, "CAP_SYS_ADMIN missing: pagemap PFNs are zeroed"
    assert out["kpageflags"] == 8
    assert out["page_idle_write"] == 0
    if "move_phys_pages_call" in out:
        assert out["move_phys_pages_call"] == 0, out["move_phys_pages"]


@in_systemd_guest
def test_start_reaches_active_after_ready(installed: Path) -> None:
    started = sh("systemctl", "start", "tierd", check=False)
    assert started.returncode == 0, sh("journalctl", "-u", "tierd", "--no-pager").stdout
    assert unit("ActiveState") == "active"
    # READY=1's status, unless the first interval has replaced it already.
    assert unit("StatusText").startswith(("mover ", "interval "))
    assert metric("tierd_config_last_reload_successful") == 1
    wait_for("an interval's STATUS=", lambda: unit("StatusText").startswith("interval "), 180)


@in_systemd_guest
def test_reload_applies_a_good_config(installed: Path) -> None:
    pid = unit("MainPID")
    cursor = journal_cursor()
    CONFIG.write_text(CONFIG.read_text().replace("interval: 5.0", "interval: 4.0", 1))
    sh("systemctl", "reload", "tierd")
    wait_for("the reload in the journal", lambda: "config reloaded" in journal_since(cursor), 120)
    assert unit("ActiveState") == "active" and unit("MainPID") == pid
    assert metric("tierd_config_last_reload_successful") == 1


@in_systemd_guest
def test_bad_config_on_reload_keeps_the_old_one_running(installed: Path) -> None:
    pid = unit("MainPID")
    good = CONFIG.read_text()
    cursor = journal_cursor()
    assert "heat_decay: 0.5" in good
    CONFIG.write_text(good.replace("heat_decay: 0.5", "heat_decay: lots", 1))
    try:
        sh("systemctl", "reload", "tierd")
        wait_for("the refusal in the journal",
                 lambda: "config reload failed" in journal_since(cursor), 120)
        assert "heat_decay" in journal_since(cursor)
        assert unit("ActiveState") == "active" and unit("MainPID") == pid
        assert metric("tierd_config_last_reload_successful") == 0
        wait_for("the next interval", lambda: unit("StatusText").startswith("interval "), 120)
        assert unit("MainPID") == pid
    finally:
        CONFIG.write_text(good)
    sh("systemctl", "reload", "tierd")
    wait_for("a good reload", lambda: metric("tierd_config_last_reload_successful") == 1, 120)


@in_systemd_guest
def test_watchdog_restarts_a_stopped_main_loop(installed: Path) -> None:
    pid = unit("MainPID")
    restarts = int(unit("NRestarts"))
    cursor = journal_cursor()
    os.kill(int(pid), 19)  # SIGSTOP: the loop stops feeding WATCHDOG=1
    watchdog = int(unit_settings(UNIT.read_text())["WatchdogSec"][0].removesuffix("s"))
    wait_for("a new main process", lambda: unit("MainPID") not in (pid, "0"), watchdog + 240)
    wait_for("active again", lambda: unit("ActiveState") == "active", 240)
    assert int(unit("NRestarts")) == restarts + 1
    assert "Watchdog timeout" in sh("journalctl", "--no-pager", "-o", "cat",
                                    f"--after-cursor={cursor}").stdout


@in_systemd_guest
def test_config_error_at_start_fails_at_once_without_a_restart_loop(installed: Path) -> None:
    good = CONFIG.read_text()
    sh("systemctl", "stop", "tierd")
    sh("systemctl", "reset-failed", "tierd", check=False)
    bad, replaced = re.subn(r"batch_pages: \d+", "batch_pages: many", good, count=1)
    assert replaced == 1
    CONFIG.write_text(bad)
    try:
        started = sh("systemctl", "start", "tierd", check=False)
        assert started.returncode != 0
        # A restart scheduled by Restart=on-failure would show as activating/auto-restart.
        assert (unit("ActiveState"), unit("SubState")) == ("failed", "failed")
        assert unit("ExecMainStatus") == "78"
        assert unit("NRestarts") == "0"
        assert "movers.batch_pages" in sh("journalctl", "-u", "tierd", "--no-pager",
                                          "-o", "cat").stdout
    finally:
        CONFIG.write_text(good)
    sh("systemctl", "reset-failed", "tierd", check=False)
    sh("systemctl", "start", "tierd")
    assert unit("ActiveState") == "active"
    sh("systemctl", "stop", "tierd")


LONG_SCAN_DROP_IN = Path("/run/systemd/system/tierd.service.d/lab-long-scan.conf")
LONG_SCAN_SECONDS = 90  # one full idle pass; longer than each timeout below


@in_systemd_guest
def test_a_long_scan_feeds_the_watchdog_and_a_stop_cuts_it_short(installed: Path) -> None:
    """Finding 4 of the robustness issue: a full idle pass paced to 90 s, against a
    60 s start timeout and a 10 s watchdog and stop timeout. Start-up must extend
    its timeout, the scan must feed the watchdog between chunks, and SIGTERM must
    end it within the stop timeout."""
    good = CONFIG.read_text()
    pages = int(Path("/proc/meminfo").read_text().split()[1]) * 1024 // os.sysconf("SC_PAGESIZE")
    rate = max(1000, pages // LONG_SCAN_SECONDS)
    paced, replaced = re.subn(r"pfns_per_second: \d+", f"pfns_per_second: {rate}", good, count=1)
    assert replaced == 1
    sh("systemctl", "stop", "tierd")
    sh("systemctl", "reset-failed", "tierd", check=False)
    LONG_SCAN_DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    LONG_SCAN_DROP_IN.write_text("[Service]\nTimeoutStartSec=60s\nWatchdogSec=10s\n"
                                 "TimeoutStopSec=10s\nRestart=no\n")
    CONFIG.write_text(paced)
    try:
        sh("systemctl", "daemon-reload")
        cursor = journal_cursor()
        began = time.monotonic()
        started = sh("systemctl", "start", "tierd", check=False)
        took = time.monotonic() - began
        assert started.returncode == 0, journal_since(cursor)
        assert took > 60, f"start took {took:.0f} s: the scan did not outlast the timeout"
        pid = unit("MainPID")
        time.sleep(30)  # steady scans, each longer than the watchdog
        assert unit("ActiveState") == "active" and unit("MainPID") == pid, journal_since(cursor)
        assert "Watchdog timeout" not in journal_since(cursor)
        sh("systemctl", "stop", "tierd")
        assert unit("Result") == "success", journal_since(cursor)  # "timeout" if SIGKILLed
    finally:
        CONFIG.write_text(good)
        LONG_SCAN_DROP_IN.unlink()
        sh("systemctl", "daemon-reload")
        sh("systemctl", "reset-failed", "tierd", check=False)
