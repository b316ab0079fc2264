"""The `tierd` console script."""

from __future__ import annotations

import subprocess
import sys

from tierd import __version__


def test_version_from_the_console_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tierd", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"tierd {__version__}"


def test_no_command_prints_help_and_fails() -> None:
    done = subprocess.run([sys.executable, "-m", "tierd"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "usage: tierd" in done.stdout
