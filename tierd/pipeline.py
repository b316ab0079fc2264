"""The parts of the daemon, built from the config: topology, heat, collectors, mover.

`build_pipeline(config, root)` opens every enabled collector through the
registry (tierd.collectors.registry), the configured mover through its own
(tierd.movers.registry), and returns them in a Pipeline whose ExitStack owns
their lifetimes: `Pipeline.close()` closes everything that was opened, and a
failure while building closes what was opened before it.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass

from tierd.collectors.collector import UNPACED, Collector, Pace, Setup
from tierd.collectors.processes import Exclusions, ProcessFilter
from tierd.collectors.registry import COLLECTORS
from tierd.collectors.topology import Topology, node_facts, read_topology
from tierd.config import Config
from tierd.errors import HostMismatch, Unusable
from tierd.heat import HeatModel, HeatParams
from tierd.kernel.root import HOST, HostRoot
from tierd.movers.batches import MoverParams
from tierd.movers.mover import Mover, mover_params
from tierd.movers.registry import MOVERS
from tierd.policy import PolicyParams
from tierd.vocabulary import PAGE_SIZE, Health

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """The parts of the Config the loop uses, as the plain parameter types of each module."""

    interval: float
    dry_run: bool
    heat: HeatParams
    policy: PolicyParams
    headroom_percent: float
    rate_mb_per_s: float
    mover: MoverParams
    exclusions: Exclusions
    kernel_tiering: str

    @classmethod
    def from_config(cls, config: Config, dry_run: bool = False) -> Settings:
        p = config.policy
        heat = HeatParams(decay=p.heat_decay, hot_threshold=p.hot_threshold,
                          cold_threshold=p.cold_threshold,
                          # A moved page sits out one round more than the hysteresis:
                          # never moved back on one round's evidence.
                          cooldown_rounds=p.hysteresis_intervals + 1)
        return cls(
            interval=config.interval,
            dry_run=config.dry_run or dry_run,
            heat=heat,
            policy=PolicyParams(hysteresis_rounds=p.hysteresis_intervals,
                                promote_share=p.budget_split.promote,
                                demote_cold=p.demote_cold, settle_units=heat.settle_units),
            headroom_percent=p.headroom_percent,
            rate_mb_per_s=config.movers.rate_mb_per_s,
            mover=mover_params(config),
            exclusions=Exclusions(pids=config.exclusions.pids, comms=config.exclusions.comms,
                                  cgroups=config.exclusions.cgroups),
            kernel_tiering=config.kernel_tiering,
        )

    def budget_pages(self, page_size: int = PAGE_SIZE) -> int:
        return int(self.rate_mb_per_s * self.interval * (1 << 20) // page_size)


@dataclass
class Pipeline:
    """Everything one daemon runs; close() releases what the collectors hold."""

    topology: Topology  # as it was at build time
    heat: HeatModel
    collectors: list[Collector]  # the usable ones, in registry order
    unusable: dict[str, Health]  # enabled collectors that could not open, and why
    mover: Mover
    process_filter: ProcessFilter
    resources: ExitStack

    def close(self) -> None:
        self.resources.close()


def build_pipeline(config: Config, root: HostRoot = HOST, pace: Pace = UNPACED) -> Pipeline:
    """Read the topology and open the collectors and the mover the config asks for.

    `pace` paces the long work of opening and collecting (see Pace).
    """
    settings = Settings.from_config(config)
    topology = read_topology(root)
    facts = node_facts(topology)
    if len({f.tier for f in facts}) < 2:
        log.warning("only one memory tier (%s): nothing to tier, tierd will only observe",
                    ", ".join(f"node {f.node}" for f in facts))
    npfns = max((e for f in facts for _, e in f.ranges), default=0)
    process_filter = ProcessFilter(settings.exclusions, root)
    setup = Setup(root, topology, process_filter, config.interval, pace)
    stack = ExitStack()
    try:
        collectors, unusable = _open_collectors(config, setup, stack)
        mover = open_mover(config, setup)
    except BaseException:
        stack.close()
        raise
    return Pipeline(topology, HeatModel(npfns, settings.heat), collectors, unusable, mover,
                    process_filter, stack)


def _open_collectors(config: Config, setup: Setup, stack: ExitStack
                     ) -> tuple[list[Collector], dict[str, Health]]:
    opened: list[Collector] = []
    unusable: dict[str, Health] = {}
    for name, entry in COLLECTORS.items():
        if not entry.enabled(config):
            if opened or not entry.fallback(config):
                continue
            log.info("no enabled collector is usable: using %s", name)
        try:
            collector = entry.open(config, setup)
        except Unusable as e:
            unusable[name] = e.health
            continue
        stack.callback(collector.close)
        opened.append(collector)
    if not opened:
        log.warning("no collector is usable: tierd can only observe")
    return opened, unusable


def open_mover(config: Config, setup: Setup) -> Mover:
    """The configured mover; for `auto`, the first in the registry this host can run."""
    kind = config.movers.kind
    skipped: list[str] = []
    for name, opener in MOVERS.items():
        if kind not in ("auto", name):
            continue
        try:
            mover = opener(config, setup)
        except Unusable as e:
            if kind == name:
                raise HostMismatch(f"movers.kind is '{kind}' but {e.health.reason}") from e
            skipped.append(f"{name}: {e.health.reason}")
            continue
        log.info("%s mover%s", name, f" ({'; '.join(skipped)})" if skipped else "")
        return mover
    raise HostMismatch(f"no mover is usable: {'; '.join(skipped)}")
