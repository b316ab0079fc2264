"""Performance monitoring units from /sys/bus/event_source/devices: which can sample memory.

Each PMU directory has `type` (the perf_event_attr.type to use), `format/`
(how named terms map onto config bits, e.g. `config:0-7` or `config1:0-15`)
and often `events/` (named events as terms, e.g. `event=0xcd,umask=0x1,ldlat=3`).
tierd looks for, in order: AMD IBS op sampling (`ibs_op`, with `l3missonly`
where the format has it), Intel PEBS load-latency (`mem-loads` on `cpu` or
`cpu_core`, `precise_ip` 2, with an `ldlat` threshold), or a raw event the
operator names in perf's `pmu/term=value,.../` syntax. Anything else is the
"no memory-sampling PMU" state, with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tierd.errors import KernelFileError, TierdError
from tierd.kernel import perf_event as pe
from tierd.kernel.root import HOST, HostRoot

DEVICES = "/sys/bus/event_source/devices"
CONFIG_FIELDS = ("config", "config1", "config2", "config3")

# What tierd asks a memory-sampling PMU for; bits the PMU refuses are dropped
# one at a time, in this order (least useful first).
MEMORY_SAMPLE_TYPE = (
    pe.SAMPLE_TID | pe.SAMPLE_TIME | pe.SAMPLE_ADDR | pe.SAMPLE_CPU
    | pe.SAMPLE_WEIGHT | pe.SAMPLE_DATA_SRC | pe.SAMPLE_PHYS_ADDR
)
OPTIONAL_SAMPLE_BITS = (pe.SAMPLE_WEIGHT, pe.SAMPLE_DATA_SRC, pe.SAMPLE_PHYS_ADDR)

IBS_OP_PERIOD = 100_000  # ops between samples (IBS needs a multiple of 16)
PEBS_PERIOD = 10_007  # qualifying loads between samples; prime, to avoid aliasing with loops
PEBS_LDLAT = 30  # cycles: loads slower than an L1/L2 hit
PEBS_PMUS = ("cpu", "cpu_core")  # cpu_core: the P-cores of a hybrid Intel part


class NoMemoryPmu(TierdError):
    """No PMU on this host can sample memory accesses (the message says why)."""


class PmuError(TierdError):
    """A PMU's sysfs description or an event string does not make sense."""


@dataclass(frozen=True)
class Format:
    """Where one named term lives: a config field and its bit ranges (low bits first)."""

    field: str
    bits: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, spec: str) -> Format:
        """`config:0-7`, `config1:0-15`, `config:16` or `config:0-7,32-35`."""
        match = re.fullmatch(r"(config[0-9]?):([0-9,\-]+)", spec.strip())
        if not match or match.group(1) not in CONFIG_FIELDS:
            raise ValueError(f"bad format {spec!r}")
        ranges = []
        for part in match.group(2).split(","):
            low, _, high = part.partition("-")
            ranges.append((int(low), int(high or low)))
        return cls(match.group(1), tuple(ranges))

    def encode(self, value: int) -> int:
        """`value` spread over this format's bit ranges."""
        out = 0
        for low, high in self.bits:
            width = high - low + 1
            out |= (value & ((1 << width) - 1)) << low
            value >>= width
        if value:
            raise ValueError(f"value too wide for {self.field} bits {self.bits}")
        return out


@dataclass(frozen=True)
class Pmu:
    name: str
    type: int
    formats: dict[str, Format] = field(default_factory=dict)
    events: dict[str, str] = field(default_factory=dict)

    def encode(self, terms: str) -> dict[str, int]:
        """Terms such as `event=0xcd,umask=0x1,ldlat=30` as config/config1/... values."""
        out = dict.fromkeys(CONFIG_FIELDS, 0)
        for term in filter(None, (t.strip() for t in terms.split(","))):
            name, _, value = term.partition("=")
            fmt = self.formats.get(name)
            if fmt is None:
                raise PmuError(f"PMU {self.name}: no format term {name!r} in {terms!r}")
            try:
                out[fmt.field] |= fmt.encode(int(value, 0) if value else 1)
            except ValueError as e:
                raise PmuError(f"PMU {self.name}: term {term!r}: {e}") from None
        return out


@dataclass(frozen=True)
class MemoryEvent:
    """A perf event that samples memory accesses, ready to become a perf_event_attr."""

    kind: str  # "ibs_op", "pebs", "raw" or "software"
    pmu: str
    type: int
    config: dict[str, int]
    precise_ip: int
    sample_period: int
    sample_type: int
    description: str

    def attr(self, sample_type: int | None = None) -> pe.PerfEventAttr:
        attr = pe.PerfEventAttr()
        attr.type = self.type
        attr.config = self.config.get("config", 0)
        attr.config1 = self.config.get("config1", 0)
        attr.config2 = self.config.get("config2", 0)
        attr.config3 = self.config.get("config3", 0)
        attr.sample_period = self.sample_period
        attr.sample_type = self.sample_type if sample_type is None else sample_type
        attr.precise_ip = self.precise_ip
        attr.disabled = 1
        attr.exclude_hv = 1
        attr.exclude_guest = 1
        return attr


def software_page_faults(sample_type: int = pe.SAMPLE_TID | pe.SAMPLE_ADDR) -> MemoryEvent:
    """Every page fault, with its address: what the lab samples, having no memory PMU."""
    return MemoryEvent(
        kind="software", pmu="software", type=pe.PERF_TYPE_SOFTWARE,
        config={"config": pe.PERF_COUNT_SW_PAGE_FAULTS}, precise_ip=0, sample_period=1,
        sample_type=sample_type, description="software page-faults (every fault)",
    )


def _read_dir_files(root: HostRoot, path: str) -> dict[str, str]:
    directory = root(path)
    if not directory.is_dir():
        return {}
    return {p.name: root.read_text(f"{path}/{p.name}").strip() for p in sorted(directory.iterdir())}


def read_pmu(name: str, root: HostRoot = HOST) -> Pmu:
    """One PMU's type, formats and named events; KernelFileError when it is gone or garbled."""
    base = f"{DEVICES}/{name}"
    type_text = root.read_text(f"{base}/type").strip()
    try:
        pmu_type = int(type_text)
    except ValueError:
        raise KernelFileError(root(f"{base}/type"), f"not a number: {type_text!r}") from None
    formats = {}
    for term, spec in _read_dir_files(root, f"{base}/format").items():
        try:
            formats[term] = Format.parse(spec)
        except ValueError as e:
            raise KernelFileError(root(f"{base}/format/{term}"), str(e)) from None
    events = {k: v for k, v in _read_dir_files(root, f"{base}/events").items()
              if not k.endswith((".scale", ".unit"))}
    return Pmu(name, pmu_type, formats, events)


def pmu_names(root: HostRoot = HOST) -> list[str]:
    directory = root(DEVICES)
    try:
        return sorted(p.name for p in directory.iterdir())
    except FileNotFoundError:
        return []
    except OSError as e:
        raise KernelFileError(directory, e.strerror or str(e)) from None


def ibs_op_event(pmu: Pmu) -> MemoryEvent:
    """AMD IBS op sampling; only L3 misses where the PMU can filter them (Zen 4+)."""
    terms = "l3missonly=1" if "l3missonly" in pmu.formats else ""
    return MemoryEvent(
        kind="ibs_op", pmu=pmu.name, type=pmu.type, config=pmu.encode(terms), precise_ip=0,
        sample_period=IBS_OP_PERIOD, sample_type=MEMORY_SAMPLE_TYPE,
        description=f"AMD IBS op{' (L3 misses only)' if terms else ''}",
    )


def pebs_load_latency_event(pmu: Pmu, ldlat: int = PEBS_LDLAT) -> MemoryEvent:
    """Intel PEBS load-latency (`mem-loads` with its `ldlat` threshold raised to `ldlat`)."""
    terms = re.sub(r"(^|,)ldlat=[^,]*", "", pmu.events["mem-loads"]).strip(",")
    if "ldlat" in pmu.formats:
        terms += f",ldlat={ldlat}"
    return MemoryEvent(
        kind="pebs", pmu=pmu.name, type=pmu.type, config=pmu.encode(terms), precise_ip=2,
        sample_period=PEBS_PERIOD, sample_type=MEMORY_SAMPLE_TYPE,
        description=f"Intel PEBS load latency >= {ldlat} cycles ({pmu.name}/mem-loads)",
    )


def raw_event(spec: str, root: HostRoot = HOST, period: int = PEBS_PERIOD) -> MemoryEvent:
    """An operator-named event in perf's syntax: `pmu/term=value,.../` plus optional `p`/`pp`."""
    match = re.fullmatch(r"([\w.\-]+)/([^/]*)/(p{0,3})", spec.strip())
    if not match:
        raise PmuError(f"raw event {spec!r}: expected pmu/term=value,.../[p|pp]")
    name, terms, precise = match.groups()
    pmu = read_pmu(name, root)
    if terms in pmu.events:
        terms = pmu.events[terms]
    return MemoryEvent(
        kind="raw", pmu=name, type=pmu.type, config=pmu.encode(terms), precise_ip=len(precise),
        sample_period=period, sample_type=MEMORY_SAMPLE_TYPE, description=f"raw event {spec}",
    )


def memory_event(root: HostRoot = HOST, raw: str | None = None) -> MemoryEvent:
    """The best memory-sampling event on this host; NoMemoryPmu (with why) when there is none."""
    if raw:
        return raw_event(raw, root)
    names = pmu_names(root)
    if not names:
        raise NoMemoryPmu(f"{root(DEVICES)} is missing: perf events not available")
    if "ibs_op" in names:
        return ibs_op_event(read_pmu("ibs_op", root))
    for name in PEBS_PMUS:
        if name in names:
            pmu = read_pmu(name, root)
            if "mem-loads" in pmu.events:
                return pebs_load_latency_event(pmu)
    raise NoMemoryPmu(
        f"no memory-sampling PMU (no ibs_op, no cpu/events/mem-loads) among {', '.join(names)}"
    )
