"""Replay an evidence trace (from `tierd run --record`) through the policy offline.

Prints, per interval, what the policy would move under the given config,
then a total (JSON with --json): for tuning policy settings without touching
a host. The simulation has no kernel: a page it "moves" keeps its recorded
PFN, so it leaves the simulation (each page is counted once), and each node's
free memory is the recorded one plus what the simulated moves freed or took,
within the node's size: totals never move more than a node holds or has room
for. A trace that is not one, or whose sizes do not fit the file or the memory
budget, is refused with exit 65 (EX_DATAERR) before anything is allocated for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tierd import policy
from tierd.commands.check_config import EX_CONFIG
from tierd.config import Config, ConfigError, load
from tierd.heat import HeatModel
from tierd.pipeline import Settings
from tierd.trace import TraceError, read_trace
from tierd.units import mib, plural
from tierd.vocabulary import Direction, NodeFacts

EX_DATAERR = 65  # sysexits.h: the input data was incorrect
Moves = Counter[tuple[Direction, int, int]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", type=Path, help="trace file written by `tierd run --record`")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="YAML config whose policy to try (default: built-in defaults)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document: every interval's moves and the total")


def _line(moves: Moves, page_size: int) -> str:
    parts = [f"{d.value} {s}->{t} {plural(n, 'page')} ({mib(n * page_size)})"
             for (d, s, t), n in sorted(moves.items()) if n]
    return ", ".join(parts) or "nothing"


def _moves_json(moves: Moves, page_size: int) -> list[dict[str, Any]]:
    return [{"direction": str(d), "source_node": s, "target_node": t, "pages": n,
             "bytes": n * page_size} for (d, s, t), n in sorted(moves.items()) if n]


def _as_moved(nodes: list[NodeFacts], net_in: Counter[int]) -> list[NodeFacts]:
    """The recorded nodes with the simulated moves' pages taken from or given to each."""
    return [dataclasses.replace(f, free_pages=min(f.managed_pages,
                                                  max(0, f.free_pages - net_in[f.node])))
            for f in nodes]


def run(args: argparse.Namespace) -> int:
    try:
        config = load(args.config) if args.config else Config()
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EX_CONFIG
    try:
        return _replay(args, Settings.from_config(config))
    except TraceError as e:
        print(f"tierd: {e}", file=sys.stderr)
        return EX_DATAERR


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    heat: HeatModel | None = None
    total: Moves = Counter()
    net_in: Counter[int] = Counter()  # pages the simulated moves brought into each node
    page_size = 4096
    intervals: list[dict[str, Any]] = []
    deferred = 0
    idle_seen = False
    for record in read_trace(args.trace):
        page_size = record.page_size
        if heat is None or heat.npfns != record.npfns:
            heat = HeatModel(record.npfns, settings.heat)
        # Heat ages per round: once the trace shows idle scans, only at those intervals.
        idle_seen = idle_seen or bool(record.idle)
        heat.fold(record.idle, record.samples, record.regions,
                  new_round=bool(record.idle) or not idle_seen)
        targets = policy.targets(_as_moved(record.nodes, net_in), settings.headroom_percent)
        plan = policy.decide(heat.heat, heat.mark, targets, settings.budget_pages(page_size),
                             settings.policy)
        moves: Moves = Counter()
        for batch in plan.batches:
            moves[(batch.direction, batch.source, batch.target)] += int(batch.pfns.size)
            net_in[batch.target] += int(batch.pfns.size)
            net_in[batch.source] -= int(batch.pfns.size)
            heat.pin(batch.pfns)  # moved: its recorded PFN no longer holds it
        total.update(moves)
        deferred += plan.deferred_pages
        intervals.append({"moves": moves, "deferred": plan.deferred_pages})
        if not args.json:
            extra = f" ({plan.deferred_pages} deferred by the rate limit)" \
                if plan.deferred_pages else ""
            print(f"interval {len(intervals)}: {_line(moves, page_size)}{extra}")
    if args.json:
        print(json.dumps({
            "intervals": [{"interval": i, "moves": _moves_json(x["moves"], page_size),
                           "deferred_pages": x["deferred"]}
                          for i, x in enumerate(intervals, 1)],
            "total": {"intervals": len(intervals), "moves": _moves_json(total, page_size),
                      "deferred_pages": deferred}}, indent=1))
        return 0
    print(f"total over {plural(len(intervals), 'interval')}: {_line(total, page_size)}; "
          f"{plural(deferred, 'page-move')} deferred by the rate limit")
    return 0
