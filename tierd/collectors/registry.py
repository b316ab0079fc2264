"""Every collector, by its config section's name, in the order the daemon opens them.

Adding a collector: write its module (a class following
tierd.collectors.collector.Collector and an `open_collector(config, setup)`),
give it a section under `collectors:` in the config schema, and add one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tierd.collectors import damon, idle, perf
from tierd.collectors.collector import Opener
from tierd.config import Config


@dataclass(frozen=True)
class Entry:
    open: Opener
    enabled: Callable[[Config], bool]


COLLECTORS: dict[str, Entry] = {
    "idle": Entry(idle.open_collector, lambda c: c.collectors.idle.enabled),
    "perf": Entry(perf.open_collector, lambda c: c.collectors.perf.enabled),
    "damon": Entry(damon.open_collector, lambda c: c.collectors.damon.enabled),
}
# Opened even when not enabled if no other collector is usable: it needs neither
# idle-page tracking nor a memory-sampling PMU.
FALLBACK = "damon"
