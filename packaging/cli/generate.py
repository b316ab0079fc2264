#!/usr/bin/env python3
"""Write tierd's man pages and shell completions into a directory (default: this one).

tierd(8) comes from the argparse parser (argparse-manpage), tierd.yaml(5)
from the config schema, the completions from the parser (shtab). The files
are committed so that the packages need neither generator;
tests/test_cli_docs.py regenerates them and fails when they drift.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import shtab
from argparse_manpage.manpage import Manpage

from tierd import __version__, cli, config
from tierd.config_schema import render_manpage

HERE = Path(__file__).resolve().parent
CHANGELOG = HERE.parent / "debian" / "changelog"

FILES_AND_SEE_ALSO = """\
[files]
.TP
.B /etc/tierd/tierd.yaml
The configuration file, see \\fBtierd.yaml\\fR(5).
.TP
.B /run/tierd/lock
Held by a running \\fBtierd run\\fR: a second one exits with status 75.
.TP
.B /usr/share/doc/tierd/examples/
Example configurations, Prometheus alerts and a Grafana dashboard.

[exit status]
0 on success; 1 on an error; 2 on a usage error; 3 when \\fBtierd status\\fR finds no
daemon; 4 when \\fBtierd probe\\fR finds no usable collector or mover; 75 when another
\\fBtierd run\\fR holds the lock; 78 on a configuration error.

[see also]
\\fBtierd.yaml\\fR(5), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1),
\\&/usr/share/doc/tierd/install.md
"""


def release_date() -> str:
    """The date of the newest changelog entry: the pages do not change every day."""
    for line in CHANGELOG.read_text().splitlines():
        if line.startswith(" -- "):
            day, month, year = line.split(",", 1)[1].split()[:3]
            return f"{day} {month} {year}"
    raise SystemExit(f"{CHANGELOG}: no signature line")


def tierd_8(include: Path) -> str:
    include.write_text(FILES_AND_SEE_ALSO)
    parser = cli.build_parser()
    page = Manpage(parser, {
        "manual_section": 8, "manual_title": "System Administration", "version": __version__,
        "project_name": "tierd", "date": release_date(), "include": str(include),
        "description": "system-wide memory tiering for hosts with slow memory"})
    return str(page)


def main(out: Path) -> None:
    os.environ["COLUMNS"] = "80"  # argparse wraps to the terminal; the pages must not
    out.mkdir(parents=True, exist_ok=True)
    (out / "tierd.8").write_text(tierd_8(out / ".tierd.8.include"))
    (out / ".tierd.8.include").unlink()
    defaults = dataclasses.asdict(config.Config())
    (out / "tierd.yaml.5").write_text(render_manpage(defaults, __version__, release_date()))
    (out / "completions").mkdir(exist_ok=True)
    (out / "completions" / "tierd").write_text(shtab.complete(cli.build_parser(), "bash"))
    (out / "completions" / "_tierd").write_text(shtab.complete(cli.build_parser(), "zsh"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
