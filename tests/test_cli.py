"""The `tierd` console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tierd import __version__, cli


def test_version_from_the_console_script() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tierd", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"tierd {__version__}"


def test_no_command_prints_help_and_fails() -> None:
    done = subprocess.run([sys.executable, "-m", "tierd"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "usage: tierd" in done.stdout


def test_cli_reference_doc_is_up_to_date() -> None:
    committed = (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    assert cli.render_reference() == committed, "docs/cli.md is stale: run `make docs`"


def test_the_cli_reference_shows_every_command_and_option() -> None:
    reference = cli.render_reference()
    for name in cli.COMMANDS:
        assert f"## `tierd {name}`" in reference
    assert "--dry-run" in reference and "--print-reference" in reference
