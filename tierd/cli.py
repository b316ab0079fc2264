"""The `tierd` command line: one subcommand per module under tierd.commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tierd import __version__
from tierd.errors import TierdError

# Subcommand name -> module in tierd.commands exposing add_arguments(parser)
# and run(args) -> int.
COMMANDS: dict[str, str] = {
    "probe": "probe",
    "topology": "topology",
    "check-config": "check_config",
    "status": "status",
    "run": "run",
    "simulate": "simulate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierd", description="System-wide memory tiering for hosts with slow memory."
    )
    parser.add_argument("--version", action="version", version=f"tierd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"tierd.commands.{module_name}")
        command = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before numpy loads: OpenBLAS's thread pool would start with every capability and
    # keep them after `tierd run` drops its own; tierd does no BLAS work.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except TierdError as e:
        print(f"tierd: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # what no interval boundary can absorb (start-up, a full fd table)
        print(f"tierd: {e}", file=sys.stderr)
        return 1
