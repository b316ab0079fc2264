"""Validate a tierd configuration file (exit 0 if usable, 78 if not).

Prints every problem as FILE:LINE: KEY: REASON (with --json, one document
with the file, ok and each problem's key, line and reason). With
--print-reference, prints the configuration reference (docs/configuration.md)
instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tierd import config
from tierd.config_schema import render_reference

EX_CONFIG = 78  # sysexits.h: configuration error; systemd's RestartPreventExitStatus=78


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", default=str(config.DEFAULT_PATH),
                        help=f"config file (default {config.DEFAULT_PATH})")
    parser.add_argument("--print-reference", action="store_true",
                        help="print the configuration reference in Markdown and exit")
    parser.add_argument("--json", action="store_true",
                        help="print the verdict and every problem as JSON on stdout")


def run(args: argparse.Namespace) -> int:
    if args.print_reference:
        sys.stdout.write(render_reference(dataclasses.asdict(config.Config())))
        return 0
    try:
        config.load(args.file)
    except config.ConfigError as e:
        if args.json:
            print(json.dumps({"file": args.file, "ok": False, "problems": [
                {"key": config.dotted(p.path), "line": p.line, "reason": p.reason}
                for p in e.problems]}, indent=1))
        else:
            print(e, file=sys.stderr)
        return EX_CONFIG
    print(json.dumps({"file": args.file, "ok": True, "problems": []}, indent=1) if args.json
          else f"{args.file}: ok")
    return 0
