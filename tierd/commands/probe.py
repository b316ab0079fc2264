"""Report which collectors and movers this kernel supports, and why not.

Runs every registered probe (tierd.probe.PROBES) without changing kernel
state. Exit status 0 when tierd can work here (a topology and at least one
source of access evidence), 4 when it could only observe: scripts and
configuration management can test for a host worth running tierd on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

from tierd.kernel.root import HostRoot
from tierd.probe import Capability, format_table, run_probes

EXIT_NOTHING_USABLE = 4
# Each group is one source of access evidence: all of its capabilities must be usable.
EVIDENCE = (("idle_page_tracking",), ("perf-pmu", "perf-events"), ("damon",))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--root", type=Path, default=Path("/"),
        help="read procfs and sysfs under this directory (default /)",
    )


def missing(capabilities: Iterable[Capability]) -> str | None:
    """Why tierd could only observe on this host, or None if it can tier memory."""
    usable = {c.name for c in capabilities if c.usable}
    if "topology" not in usable:
        return "no usable NUMA topology"
    if not any(set(group) <= usable for group in EVIDENCE):
        return "no usable collector (idle-page tracking, a sampling PMU or DAMON)"
    return None


def run(args: argparse.Namespace) -> int:
    capabilities = run_probes(HostRoot(args.root))
    if args.json:
        print(json.dumps([c.as_dict() for c in capabilities], indent=2))
    else:
        print(format_table(capabilities))
    why = missing(capabilities)
    if why is None:
        return 0
    print(f"tierd: {why}: tierd would only observe", file=sys.stderr)
    return EXIT_NOTHING_USABLE
