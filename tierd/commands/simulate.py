"""Replay an evidence trace (from `tierd run --record`) through the policy offline.

Prints, per interval, what the policy would move under the given config,
then a total: for tuning policy settings without touching a host. The
simulation has no kernel: a page it "moves" only starts its cooldown, and
node capacities are those recorded (what the real run saw). A trace that
is not one, or whose sizes do not fit the file or the memory budget, is
refused with exit 65 (EX_DATAERR) before anything is allocated for it.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from tierd import policy
from tierd.commands.check_config import EX_CONFIG
from tierd.config import Config, ConfigError, load
from tierd.heat import HeatModel
from tierd.pipeline import Settings
from tierd.trace import TraceError, read_trace
from tierd.vocabulary import Direction

EX_DATAERR = 65  # sysexits.h: the input data was incorrect


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", type=Path, help="trace file written by `tierd run --record`")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="YAML config whose policy to try (default: built-in defaults)")


def _line(moves: Counter[tuple[Direction, int, int]], page_size: int) -> str:
    parts = [f"{d.value} {s}->{t} {n} pages ({n * page_size / (1 << 20):.1f} MiB)"
             for (d, s, t), n in sorted(moves.items()) if n]
    return ", ".join(parts) or "nothing"


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
    total: Counter[tuple[Direction, int, int]] = Counter()
    page_size = 4096
    intervals = deferred = 0
    idle_seen = False
    for record in read_trace(args.trace):
        intervals += 1
        page_size = record.page_size
        if heat is None or heat.npfns != record.npfns:
            heat = HeatModel(record.npfns, settings.heat)
        # Heat ages per round: once the trace shows idle scans, only at those intervals.
        idle_seen = idle_seen or bool(record.idle)
        heat.fold(record.idle, record.samples, record.regions,
                  new_round=bool(record.idle) or not idle_seen)
        targets = policy.targets(record.nodes, settings.headroom_percent)
        plan = policy.decide(heat.heat, heat.mark, targets, settings.budget_pages(page_size),
                             settings.policy)
        moves: Counter[tuple[Direction, int, int]] = Counter()
        for batch in plan.batches:
            moves[(batch.direction, batch.source, batch.target)] += int(batch.pfns.size)
            heat.cool_down(batch.pfns)
        total.update(moves)
        deferred += plan.deferred_pages
        extra = f" ({plan.deferred_pages} deferred by the rate limit)" if plan.deferred_pages \
            else ""
        print(f"interval {intervals}: {_line(moves, page_size)}{extra}")
    print(f"total over {intervals} intervals: {_line(total, page_size)}; "
          f"{deferred} page-moves deferred by the rate limit")
    return 0
