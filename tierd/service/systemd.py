"""systemd integration: sd_notify (readiness, status, reloads, watchdog), journal logging.

tierd runs as a `Type=notify` service. The daemon says READY=1 once its
collectors are open and its metrics port is bound, a one-line STATUS= every
interval, RELOADING=1 ... READY=1 around a config reload, WATCHDOG=1 every
loop iteration and between chunks of long work (a loop that stops feeding it
is killed and restarted by systemd), EXTEND_TIMEOUT_USEC= while a long
start-up makes progress, and STOPPING=1 on the way out.

systemd-python (Debian's python3-systemd) is used where installed; without it
a few lines write the same datagrams to $NOTIFY_SOCKET. Outside systemd every
call is a no-op that returns False. A failure to notify never raises: the
service manager being away must not take the daemon down.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

# Long work sends a keep-alive at most this often; each start-up one grants the
# start this much more time (several keep-alives' worth, so one late chunk is not fatal).
KEEPALIVE_SECONDS = 5.0
START_EXTENSION_SECONDS = 60.0

try:
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # systemd-python is optional (pip installs, containers)
    _sd_daemon = None
    _sd_journal = None


def _socket_address(value: str) -> str | None:
    """The AF_UNIX address in $NOTIFY_SOCKET: a path, or "@name" for an abstract socket."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # vsock: and other forms are for VMs; tierd runs on the host


def send_datagram(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send one sd_notify datagram the way sd_notify(3) does, without libsystemd."""
    address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as e:
        log.debug("sd_notify %r to %r failed: %s", state, address, e)
        return False
    return True


def _library_notify(state: str) -> bool:
    assert _sd_daemon is not None
    try:
        return bool(_sd_daemon.notify(state))
    except OSError as e:  # python-systemd raises on sendmsg errors
        log.debug("sd_notify %r failed: %s", state, e)
        return False


def default_sender() -> Callable[[str], bool]:
    """systemd-python's notify where installed, else the $NOTIFY_SOCKET fallback."""
    return _library_notify if _sd_daemon is not None else send_datagram


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds of WatchdogSec= granted to this process, or None without a watchdog."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for a parent (e.g. a wrapper that exec'd python)
    return int(usec) / 1e6


class Notifier:
    """What tierd tells the service manager; every method is a cheap no-op outside it."""

    def __init__(self, send: Callable[[str], bool] | None = None,
                 environ: Mapping[str, str] = os.environ) -> None:
        self._send = send or default_sender()
        interval = watchdog_interval(environ)
        self._ping_every = interval / 2 if interval else math.inf
        self._ready = False
        self._last_keepalive = -math.inf

    def keepalive(self) -> bool:
        """Long work is progressing: before READY extend the start timeout, after it feed
        the watchdog; sent at most every KEEPALIVE_SECONDS, however often called."""
        now = time.monotonic()
        if now - self._last_keepalive < min(KEEPALIVE_SECONDS, self._ping_every):
            return False
        self._last_keepalive = now
        if self._ready:
            return self.watchdog()
        return self._send(f"EXTEND_TIMEOUT_USEC={int(START_EXTENSION_SECONDS * 1e6)}")

    def ready(self, status: str) -> bool:
        """Startup is done: collectors open, metrics port bound."""
        self._ready = True
        return self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, summary: str) -> bool:
        """A one-line summary shown by `systemctl status tierd`."""
        return self._send(f"STATUS={_one_line(summary)}")

    def reloading(self) -> bool:
        """A reload starts; follow with reloaded(). MONOTONIC_USEC is what systemd 253+
        (Type=notify-reload) wants with RELOADING=1; 252 ignores it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nSTATUS=reloading configuration\nMONOTONIC_USEC={usec}")

    def reloaded(self, status: str) -> bool:
        """A reload ended (applied or refused: the daemon keeps running either way)."""
        return self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        """The main loop is alive."""
        return self._send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self._send("STOPPING=1\nSTATUS=stopping")

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """stop.wait(seconds), sending WATCHDOG=1 at once and every half WatchdogSec
        meanwhile, so an interval longer than the watchdog is not mistaken for a hang."""
        deadline = time.monotonic() + seconds
        while True:
            self.watchdog()
            left = deadline - time.monotonic()
            if left <= 0:
                return stop.is_set()
            if stop.wait(min(left, self._ping_every)):
                return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


class PriorityFormatter(logging.Formatter):
    """Prefix each line with its syslog priority ("<3>") so journald, reading a
    service's stderr, files it at the right level without systemd-python."""

    PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                  (logging.INFO, 6))

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self.PRIORITIES if record.levelno >= level), 7)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(environ: Mapping[str, str] = os.environ) -> bool:
    """Is stderr the journal? ($JOURNAL_STREAM names the stream's device:inode.)"""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def journal_handler() -> logging.Handler | None:
    """A handler for the journal when stderr goes there, else None (keep stderr).

    With systemd-python: JournalHandler, which sends priorities and the logger
    name as fields. Without: stderr with "<N>" priority prefixes.
    """
    if not stderr_is_journal():
        return None
    fmt = "%(name)s: %(message)s"
    if _sd_journal is not None:
        handler: logging.Handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="tierd")
        handler.setFormatter(logging.Formatter(fmt))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PriorityFormatter(fmt))
    return handler


def log_to_journal(logger: logging.Logger | None = None) -> bool:
    """Replace `logger`'s (default: root) handlers with journal_handler() when under
    journald; True if it did."""
    handler = journal_handler()
    if handler is None:
        return False
    target = logger or logging.getLogger()
    for old in list(target.handlers):
        target.removeHandler(old)
    target.addHandler(handler)
    return True
