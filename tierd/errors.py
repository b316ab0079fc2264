"""Errors tierd reports to its user: each names the file, key and reason."""

from __future__ import annotations

from pathlib import Path

from tierd.vocabulary import Health


class TierdError(Exception):
    """Base of every error tierd reports to its user (never a bare traceback)."""


class KernelFileError(TierdError):
    """A kernel file (procfs, sysfs) is missing, unreadable or malformed."""

    def __init__(self, path: Path | str, reason: str, key: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.key = key
        where = f"{self.path}: {key}" if key else str(self.path)
        super().__init__(f"{where}: {reason}")


class HostMismatch(TierdError):
    """A valid config that this host cannot honour (e.g. movers.kind: phys on a stock kernel).

    Retrying cannot help, so `tierd run` exits 78 (EX_CONFIG) as for a bad file.
    """


class Unusable(TierdError):
    """A collector or mover that cannot run on this host; its `health` says why."""

    def __init__(self, health: Health) -> None:
        self.health = health
        super().__init__(health.reason)


class Interrupted(TierdError):
    """Long work (a paced scan) cut short because the daemon is stopping."""
