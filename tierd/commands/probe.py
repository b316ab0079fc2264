"""Report which collectors and movers this kernel supports, and why not.

Runs every registered probe (tierd.probe.PROBES) without changing kernel
state. Exit status 0 whatever the report says: an unusable capability is
information, not a failure of this command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tierd.kernel.root import HostRoot
from tierd.probe import format_table, run_probes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--root", type=Path, default=Path("/"),
        help="read procfs and sysfs under this directory (default /)",
    )


def run(args: argparse.Namespace) -> int:
    capabilities = run_probes(HostRoot(args.root))
    if args.json:
        print(json.dumps([c.as_dict() for c in capabilities], indent=2))
    else:
        print(format_table(capabilities))
    return 0
