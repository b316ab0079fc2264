"""Capability report: which collectors and movers this kernel supports, and why not.

Adding a probe (one line here):
  1. In your module write `def probe(root: HostRoot) -> Capability | list[Capability]`.
     It must not change kernel state, should be fast, and says *why* a
     capability is unusable in `reason` (missing file, missing privilege,
     missing PMU, not the tierd kernel, ...). For a usable capability,
     `reason` may carry a short note ("ibs_op, l3missonly").
  2. Append "package.module:function" to PROBES below.

Collectors also carry a live `health` attribute (a `tierd.vocabulary.Health`:
ok, degraded or disabled, and why) that their probe and the metrics read; a collector
never raises on bad kernel input, it changes its health.

`run_probes` imports each probe lazily, so a broken or slow import costs only
its own entry: a probe that raises is reported as unusable with the error.
`tierd probe` prints the result as a table or JSON.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

from tierd.kernel.root import HOST, HostRoot
from tierd.vocabulary import Capability, Health, State

__all__ = ["Capability", "Health", "State", "format_table", "run_probe", "run_probes"]


ProbeFunction = Callable[[HostRoot], Capability | list[Capability]]

# "module:function" of every probe, in report order.
PROBES: list[str] = [
    "tierd.collectors.topology:probe",
    "tierd.collectors.idle:probe",
    "tierd.collectors.perf_samples:probe",
    "tierd.collectors.perf_bcc:probe",
    "tierd.collectors.damon:probe",
    "tierd.kernel.move_phys:probe",
]


def _load(spec: str) -> ProbeFunction:
    module_name, _, function = spec.partition(":")
    probe: ProbeFunction = getattr(importlib.import_module(module_name), function or "probe")
    return probe


def _as_list(result: Capability | Iterable[Capability]) -> list[Capability]:
    return [result] if isinstance(result, Capability) else list(result)


def run_probe(spec: str, root: HostRoot = HOST) -> list[Capability]:
    """Run one probe; its failure becomes an unusable capability, never an exception."""
    try:
        return _as_list(_load(spec)(root))
    except Exception as e:  # a probe bug must not hide the other capabilities
        name = spec.partition(":")[0].rsplit(".", 1)[-1]
        return [Capability(name, False, f"probe {spec} failed: {type(e).__name__}: {e}")]


def run_probes(root: HostRoot = HOST, specs: Iterable[str] | None = None) -> list[Capability]:
    """Every registered probe's capabilities, in PROBES order."""
    return [cap for spec in (PROBES if specs is None else specs) for cap in run_probe(spec, root)]


def format_table(capabilities: Iterable[Capability]) -> str:
    """One line per capability: name, usable/unavailable, reason."""
    caps = list(capabilities)
    width = max((len(c.name) for c in caps), default=0)
    lines = [
        f"{c.name:<{width}}  {'usable' if c.usable else 'unavailable':<11}  {c.reason}".rstrip()
        for c in caps
    ]
    return "\n".join(lines)
