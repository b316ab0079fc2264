"""Signals for `tierd run`: the handlers only note what arrived; the main loop acts.

A handler runs on the main thread between two bytecodes, in the middle of
whatever the loop was doing (holding a lock, half through a log line). So it
only records the signal and wakes the loop: SIGTERM and SIGINT also set the
stop event, which long work checks between chunks. The loop, between
intervals, reloads once for any number of SIGHUPs received meanwhile and logs
the rest. SIGUSR1 and SIGUSR2 have no meaning: they are logged and ignored
instead of killing the daemon without cleanup.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP = frozenset({signal.SIGTERM, signal.SIGINT})
RELOAD = signal.SIGHUP
IGNORED = frozenset({signal.SIGUSR1, signal.SIGUSR2})


class Signals:
    """What arrived since the loop last looked, and an event that wakes the loop."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.wake = threading.Event()
        self._received: set[signal.Signals] = set()

    def install(self) -> None:
        for signum in (*STOP, RELOAD, *IGNORED):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        received = signal.Signals(signum)
        self._received.add(received)
        if received in STOP:
            self.stop.set()
        self.wake.set()

    def take(self) -> set[signal.Signals]:
        """The signals received since the last take(), each once however often it came."""
        self.wake.clear()
        # A handler running between the read and the swap adds to the set returned.
        received, self._received = self._received, set()
        return received
