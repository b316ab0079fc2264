"""Validate a tierd configuration file (exit 0 if usable, 78 if not).

Prints every problem as FILE:LINE: KEY: REASON. With --print-reference,
prints the configuration reference (docs/configuration.md) instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tierd import config
from tierd.config_schema import render_reference

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's RestartPreventExitStatus=78


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", default=str(config.DEFAULT_PATH),
                        help=f"config file (default {config.DEFAULT_PATH})")
    parser.add_argument("--print-reference", action="store_true",
                        help="print the configuration reference in Markdown and exit")


def run(args: argparse.Namespace) -> int:
    if args.print_reference:
        sys.stdout.write(render_reference(dataclasses.asdict(config.Config())))
        return 0
    try:
        config.load(args.file)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return EX_CONFIG
    print(f"{args.file}: ok")
    return 0
