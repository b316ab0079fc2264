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
    # Opened, though not enabled, when no collector before it is usable.
    fallback: Callable[[Config], bool] = lambda config: False


COLLECTORS: dict[str, Entry] = {
    "idle": Entry(idle.open_collector, lambda c: c.collectors.idle.enabled),
    "perf": Entry(perf.open_collector, lambda c: c.collectors.perf.enabled),
    # DAMON needs neither idle-page tracking nor a memory-sampling PMU: `auto` makes
    # it the fallback, `false` keeps it off even then.
    "damon": Entry(damon.open_collector, lambda c: c.collectors.damon.enabled is True,
                   lambda c: c.collectors.damon.enabled == "auto"),
}
