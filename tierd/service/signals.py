"""Signals for `tierd run`: nothing runs in a handler; a relay thread notes them, the loop acts.

A Python signal handler runs on the main thread between two bytecodes, in
the middle of whatever the loop was doing, possibly inside a lock: even
setting a threading.Event there can deadlock (the Event's lock is the one
the interrupted wait holds). So the handlers are empty and Python's wakeup
fd carries each signal's number to a relay thread, which notes it and sets
the events: SIGTERM and SIGINT set the stop event, which long work checks
between chunks; every signal sets `wake`, which ends the loop's wait between
intervals. The loop then reloads once for any number of SIGHUPs received
meanwhile and logs the rest. SIGUSR1 and SIGUSR2 have no meaning: they are
logged and ignored instead of killing the daemon without cleanup.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from tierd.kernel import capabilities

log = logging.getLogger(__name__)

STOP = frozenset({signal.SIGTERM, signal.SIGINT})
RELOAD = signal.SIGHUP
IGNORED = frozenset({signal.SIGUSR1, signal.SIGUSR2})


def _noted(_signum: int, _frame: FrameType | None) -> None:
    """The handler: empty; the wakeup fd already carries the signal to the relay."""


class Signals:
    """What arrived since the loop last looked, and an event that wakes the loop."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.wake = threading.Event()
        self._received: set[signal.Signals] = set()
        self._lock = threading.Lock()

    def install(self) -> None:
        """Route STOP, RELOAD and IGNORED through the relay thread (main thread only)."""
        read, write = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(write, False)  # a full pipe drops a byte; a burst is one reload anyway
        threading.Thread(target=self._relay, args=(read,), name="tierd-signals",
                         daemon=True).start()
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for signum in (*STOP, RELOAD, *IGNORED):
            signal.signal(signum, _noted)

    def _relay(self, read: int) -> None:
        try:
            capabilities.drop_all()  # it only reads a pipe
        except OSError as e:
            log.warning("signals: could not drop capabilities: %s", e)
        while data := os.read(read, 64):
            for signum in data:
                self.note(signum)

    def note(self, signum: int) -> None:
        """A signal arrived (called by the relay thread, never by a handler)."""
        received = signal.Signals(signum)
        with self._lock:
            self._received.add(received)
        if received in STOP:
            self.stop.set()
        self.wake.set()

    def take(self) -> set[signal.Signals]:
        """The signals received since the last take(), each once however often it came."""
        self.wake.clear()
        with self._lock:
            received, self._received = self._received, set()
        return received
