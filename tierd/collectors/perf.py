"""The perf collector in the pipeline: the configured event and backend, sampled each interval.

Picks the first configured event this host's PMU can sample (or the best one
it offers), then the configured backend (bcc, falling back to the ctypes
ring, tierd.collectors.perf_bcc.perf_collector).
"""

from __future__ import annotations

from dataclasses import replace

from tierd.collectors.collector import Setup
from tierd.collectors.evidence import Evidence
from tierd.collectors.perf_bcc import BccSampleCollector, perf_collector
from tierd.collectors.perf_samples import PerfSampleCollector, online_cpus
from tierd.config import Config
from tierd.errors import TierdError, Unusable
from tierd.kernel import pmu
from tierd.kernel.root import HostRoot
from tierd.vocabulary import Health, State


def configured_event(root: HostRoot, events: tuple[str, ...]) -> pmu.MemoryEvent:
    """The first configured event this host can sample, or the best one it offers."""
    if not events:
        return pmu.memory_event(root, None)
    reasons = []
    for name in events:
        try:
            return pmu.memory_event(root, name)
        except TierdError as e:
            reasons.append(f"{name}: {e}")
    raise TierdError("no configured perf event is usable: " + "; ".join(reasons))


class PerfFeed:
    """Memory-access samples, resolved to PFNs, of one interval."""

    name = "perf"
    tracks_all_pages = False  # samples find the pages in use, not every user page

    def __init__(self, sampler: PerfSampleCollector | BccSampleCollector) -> None:
        self.sampler = sampler

    @property
    def health(self) -> Health:
        return self.sampler.health

    def collect(self, interval: float) -> Evidence:
        return Evidence(samples=[self.sampler.collect()])

    def close(self) -> None:
        self.sampler.close()


def open_collector(config: Config, setup: Setup) -> PerfFeed:
    cfg = config.collectors.perf
    try:
        event = configured_event(setup.root, cfg.events)
    except TierdError as e:
        raise Unusable(Health(State.DISABLED, str(e))) from e
    event = replace(event, sample_period=cfg.sample_period)
    sampler = perf_collector(cfg.backend, event, online_cpus(setup.root), setup.root)
    # Degraded from the start (some CPUs failed): not used, and the health says why.
    if sampler.health.state is not State.OK:
        sampler.close()
        raise Unusable(sampler.health)
    return PerfFeed(sampler)
