"""Where kernel files are read from: `/` on a host, a fixture tree in tests."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tierd.errors import KernelFileError


@dataclass(frozen=True)
class HostRoot:
    """A root prefix for every procfs and sysfs path (like node_exporter's --path.sysfs)."""

    path: Path = Path("/")

    def __call__(self, kernel_path: str) -> Path:
        """Map an absolute kernel path such as "/proc/zoneinfo" under this root."""
        return self.path / kernel_path.lstrip("/")

    def fspath(self, kernel_path: str) -> str:
        """The same mapping as a plain string, for per-process /proc reads: they are
        many and small, and a Path per read is a real share of one."""
        return self._prefix + kernel_path

    @cached_property
    def _prefix(self) -> str:
        return str(self.path).rstrip("/")

    def read_text(self, kernel_path: str) -> str:
        path = self(kernel_path)
        try:
            return path.read_text()
        except FileNotFoundError:
            raise KernelFileError(path, "missing") from None
        except PermissionError:
            raise KernelFileError(path, "permission denied") from None
        except OSError as e:
            raise KernelFileError(path, e.strerror or str(e)) from None


HOST = HostRoot()
