"""The `tierd` command line: one subcommand per module under tierd.commands."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tierd import __version__
from tierd.errors import TierdError
from tierd.service import logs

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
# What a shell reports for a process killed by SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tierd", description="System-wide memory tiering for hosts with slow memory."
    )
    parser.add_argument("--version", action="version", version=f"tierd {__version__}")
    parser.add_argument("--log-level", choices=logs.LEVELS, default="info",
                        help="least severe log level shown (default info)")
    parser.add_argument("--log-format", choices=logs.FORMATS, default="text",
                        help="text (the journal's, under systemd), or json or logfmt for log"
                             " collectors without journald (default text)")
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const",
                        const="debug", help="same as --log-level debug")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"tierd.commands.{module_name}")
        command = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except TierdError as e:
        print(f"tierd: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`tierd probe | head -1`): no traceback, and no second
        # error when Python flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
