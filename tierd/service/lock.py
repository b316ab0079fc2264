"""One tierd per host: `tierd run` holds an exclusive flock on /run/tierd/lock.

Two daemons would run two movers over the same pages. The lock lives in
systemd's RuntimeDirectory (tierd.service sets RuntimeDirectory=tierd, and
$RUNTIME_DIRECTORY names it; tests point it elsewhere). The kernel drops a
flock when its holder exits, however it exits, so a crash leaves no stale lock.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path

from tierd.errors import TierdError

RUN_DIR = Path("/run/tierd")


class AlreadyRunning(TierdError):
    """Another tierd holds the lock."""


def run_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """tierd's directory under /run: $RUNTIME_DIRECTORY under systemd, else RUN_DIR."""
    # systemd joins several RuntimeDirectory= paths with ':'; tierd.service has one.
    directory = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(directory or RUN_DIR)


def lock_path(environ: Mapping[str, str] = os.environ) -> Path:
    return run_dir(environ) / "lock"


class InstanceLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> InstanceLock:
        """Take the lock, or raise AlreadyRunning naming the holder's pid."""
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise TierdError(f"{self.path}: cannot open the lock: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(f"another tierd is running (pid {holder} holds {self.path}):"
                                 " one tierd per host") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
