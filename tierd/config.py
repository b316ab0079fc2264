"""tierd's configuration: a typed, immutable tree loaded from YAML.

The tree (every key is optional; defaults below; durations in seconds):

    interval: 5.0                  # main-loop period: collect, decide, move
    dry_run: false                 # decide and count, never move a page
    collectors:
      idle:                        # /sys/kernel/mm/page_idle/bitmap
        enabled: true
        interval: 10.0             # seconds between two scans of a PFN: one round
        nodes: []                  # NUMA nodes to scan; [] = every node with memory
        pfns_per_second: 1000000   # scan rate cap (the bitmap's rmap walks cost CPU)
      perf:                        # IBS / PEBS / software-event samples
        enabled: true
        backend: ctypes            # ctypes | bcc
        events: []                 # perf event names; [] = the best the CPU offers
        sample_period: 10007       # events per sample
      damon:                       # DAMON access monitoring
        enabled: auto              # auto (when nothing else is usable) | true | false
        operations: vaddr          # vaddr (largest processes) | paddr (physical ranges)
        sampling_interval: 0.005
        aggregation_interval: 0.1
    policy:
      heat_decay: 0.5              # share of a page's heat kept from one round to the next
      hot_threshold: 4.0           # heat at or above which a slow-tier page is hot
      cold_threshold: 0.5          # heat at or below which a fast-tier page is cold
      hysteresis_intervals: 1      # consecutive hot (cold) rounds before a move
      headroom_percent: 2.0        # kept free above the watermark while hot pages wait below
      demote_cold: false           # true: demote every settled-cold page, room needed or not
      budget_split:                # the interval's move budget (movers.rate_mb_per_s x interval)
        promote: 0.5
        demote: 0.5                # promote + demote == 1
    movers:
      kind: auto                   # auto | phys (move_phys_pages) | pid (move_pages(2))
      batch_pages: 8192            # pages per syscall (32 MiB)
      rate_mb_per_s: 256.0         # migration bandwidth cap
      move_all_shared: auto        # MPOL_MF_MOVE_ALL for pages mapped by several processes;
                                   # auto: both movers (each checks every mapper's cpuset)
    exclusions:
      cgroups: []                  # cgroup v2 paths, e.g. /system.slice/db.service
      pids: []
      comms: []                    # fnmatch patterns on the process name
    kernel_tiering: warn           # coexist | warn | refuse: when NUMA balancing tiering or
                                   # demotion is on in the kernel
    metrics:
      enabled: true
      address: 127.0.0.1
      port: 9748
      allow_remote: false          # must be true to bind a non-loopback address

`load(path)` returns a Config or raises ConfigError, whose message names the
file, line, key path and reason of every problem. The JSON schema in
tierd.config_schema is the validator (jsonschema); the few rules a schema
cannot state (cold below hot, shares summing to 1, remote metrics opt-in) are
checked here after it. `ConfigStore` keeps the running config across reloads.

A *round* is one idle scan, or one interval when the idle collector is off:
heat decays, and hysteresis and cooldowns count, per round (tierd.heat).
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, NoReturn

import jsonschema
import yaml

from tierd.config_schema import SCHEMA
from tierd.errors import TierdError

DEFAULT_PATH = Path("/etc/tierd/tierd.yaml")
# Limits checked before any parsing, so every file is refused in time linear in its size.
MAX_FILE_BYTES = 64 << 10  # a config is a few KiB; refuse anything that could be a mistake
MAX_DEPTH = 32  # the tree is 4 deep; deeper nesting is hostile or broken
MAX_LIST_ITEMS = 1024  # as the schema says; its uniqueness check is quadratic
# The error message is logged and served on the status page: it stays short.
MAX_PROBLEMS_SHOWN = 20
MAX_LINE_CHARS = 300


@dataclass(frozen=True)
class IdleCollectorConfig:
    enabled: bool = True
    interval: float = 10.0
    nodes: tuple[int, ...] = ()
    pfns_per_second: int = 1_000_000


@dataclass(frozen=True)
class PerfCollectorConfig:
    enabled: bool = True
    backend: str = "ctypes"
    events: tuple[str, ...] = ()
    sample_period: int = 10007  # prime, so sampling does not alias with loop strides


@dataclass(frozen=True)
class DamonCollectorConfig:
    enabled: bool | str = "auto"  # auto: only when no other collector is usable
    operations: str = "vaddr"
    sampling_interval: float = 0.005
    aggregation_interval: float = 0.1


@dataclass(frozen=True)
class CollectorsConfig:
    idle: IdleCollectorConfig = field(default_factory=IdleCollectorConfig)
    perf: PerfCollectorConfig = field(default_factory=PerfCollectorConfig)
    damon: DamonCollectorConfig = field(default_factory=DamonCollectorConfig)


@dataclass(frozen=True)
class BudgetSplit:
    promote: float = 0.5
    demote: float = 0.5


@dataclass(frozen=True)
class PolicyConfig:
    heat_decay: float = 0.5
    hot_threshold: float = 4.0
    cold_threshold: float = 0.5
    hysteresis_intervals: int = 1
    headroom_percent: float = 2.0
    demote_cold: bool = False
    budget_split: BudgetSplit = field(default_factory=BudgetSplit)


@dataclass(frozen=True)
class MoversConfig:
    kind: str = "auto"
    batch_pages: int = 8192
    rate_mb_per_s: float = 256.0
    move_all_shared: bool | str = "auto"


@dataclass(frozen=True)
class ExclusionsConfig:
    cgroups: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    comms: tuple[str, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9748
    allow_remote: bool = False


@dataclass(frozen=True)
class Config:
    interval: float = 5.0
    dry_run: bool = False
    collectors: CollectorsConfig = field(default_factory=CollectorsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    movers: MoversConfig = field(default_factory=MoversConfig)
    exclusions: ExclusionsConfig = field(default_factory=ExclusionsConfig)
    kernel_tiering: str = "warn"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file."""

    path: KeyPath
    reason: str
    line: int | None  # 1-based, None when the file has no line to point at

    def render(self, file: Path | str) -> str:
        where = f"{file}:{self.line}" if self.line else str(file)
        key = dotted(self.path)
        return f"{where}: {key}: {self.reason}" if key else f"{where}: {self.reason}"


class ConfigError(TierdError):
    """A config file that cannot be used; lists every problem found."""

    def __init__(self, file: Path | str, problems: list[Problem]) -> None:
        self.file = Path(file)
        self.problems = problems
        lines = [_clip(p.render(file), MAX_LINE_CHARS) for p in problems[:MAX_PROBLEMS_SHOWN]]
        if len(problems) > MAX_PROBLEMS_SHOWN:
            lines.append(f"{_clip(str(file), MAX_LINE_CHARS)}: "
                         f"and {len(problems) - MAX_PROBLEMS_SHOWN} more problems")
        super().__init__("\n".join(lines))


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars - 3] + "..."


def dotted(path: KeyPath) -> str:
    """('policy', 'budget_split', 'promote') -> 'policy.budget_split.promote'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- YAML: safe loading, duplicate keys and aliases refused, lines kept ------


class _YamlProblem(Exception):
    def __init__(self, reason: str, mark: yaml.Mark | None, path: KeyPath = ()) -> None:
        self.reason = reason
        self.mark = mark
        self.path = path  # where it is, when known better than by the mark
        super().__init__(reason)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader (no python/* tags) that also refuses aliases and deep nesting.

    Aliases are refused because a config never needs them and they are how
    "billion laughs" documents blow up everything that walks the tree.
    """

    def __init__(self, stream: bytes) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # types-PyYAML gap
            raise _YamlProblem(f"YAML aliases (*{event.anchor}) are not allowed", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]  # types-PyYAML gap
                raise _YamlProblem("nested too deeply", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # SafeConstructor lets Python errors escape on explicitly tagged junk
        # ("!!int" alone, "!!bool maybe") and on ints past Python's digit limit.
        try:
            return super().construct_object(node, deep)
        except (ValueError, IndexError, KeyError, TypeError, AttributeError):
            tag = node.tag.rsplit(":", 1)[-1]
            raise _YamlProblem(f"cannot read {_short(node.value)} as {tag}",
                               node.start_mark) from None


    def construct_undefined(self, node: yaml.Node) -> NoReturn:
        raise _YamlProblem(f"tag {node.tag!r} is not allowed: only plain YAML values",
                           node.start_mark)


_StrictLoader.add_constructor(None, _StrictLoader.construct_undefined)


class _Document:
    """A parsed file: its value, and where each key path is written.

    Indexing happens on the node tree before construction, so an error while
    constructing a value (a refused tag, an over-long number) can name its key.
    Also refuses duplicate keys, which SafeLoader silently lets the last win.
    """

    def __init__(self) -> None:
        self.value: Any = {}  # an empty file (or only comments) means all defaults
        self.lines: dict[KeyPath, int] = {}  # key path -> 1-based line of the key
        self._paths_at: dict[tuple[int, int], KeyPath] = {}  # value's (line, col) -> path

    def read(self, data: bytes) -> None:
        loader = _StrictLoader(data)
        try:
            node = loader.get_single_node()
            if node is not None:
                self._index(loader, node, ())
                self.value = loader.construct_document(node)
        finally:
            loader.dispose()

    def path_at(self, mark: yaml.Mark | None) -> KeyPath:
        return self._paths_at.get((mark.line, mark.column), ()) if mark else ()

    def _index(self, loader: _StrictLoader, node: yaml.Node, path: KeyPath) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        self._paths_at[(node.start_mark.line, node.start_mark.column)] = path
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node) if isinstance(
                    key_node, yaml.ScalarNode) else None
                if not isinstance(key, str):
                    what = _describe(key) if key is not None else "a list or mapping"
                    raise _YamlProblem(f"keys are names, got {what}: quote it or remove it",
                                       key_node.start_mark, path)
                if key in seen:
                    raise _YamlProblem(f"duplicate key {dotted((*path, key))!r}",
                                       key_node.start_mark)
                seen.add(key)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                self._index(loader, value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            if len(node.value) > MAX_LIST_ITEMS:
                raise _YamlProblem(f"a list of {len(node.value)} items; at most "
                                   f"{MAX_LIST_ITEMS} are allowed", node.start_mark, path)
            for i, item in enumerate(node.value):
                self._index(loader, item, (*path, i))


def _line_for(index: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of `path`, or of its nearest ancestor that is in the file."""
    for n in range(len(path), -1, -1):
        if path[:n] in index:
            return index[path[:n]]
    return None


# --- validation -----------------------------------------------------------------

_VALIDATOR = jsonschema.Draft7Validator(SCHEMA)


def _schema_problems(data: Any, index: dict[KeyPath, int]) -> list[Problem]:
    problems = []
    for error in _VALIDATOR.iter_errors(data):
        for path, reason in _explain(error):
            problems.append(Problem(path, reason, _line_for(index, path)))
    return problems


def _explain(error: jsonschema.ValidationError) -> Iterator[tuple[KeyPath, str]]:
    """Turn one jsonschema error into (key path, reason) pairs a user can act on."""
    path: KeyPath = tuple(error.absolute_path)
    kind, value = error.validator, error.instance
    expected: Any = error.validator_value
    if kind == "additionalProperties" and isinstance(value, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        known = ", ".join(schema.get("properties", {}))
        for key in value:
            if key not in schema.get("properties", {}):
                hint = "" if isinstance(key, str) else f" ({_describe(key)}: quote keys)"
                yield (*path, str(key)), f"unknown key{hint} (expected one of: {known})"
    elif kind == "type":
        yield path, f"expected {_type_words(expected)}, got {_describe(value)}"
    elif kind == "enum":
        yield path, f"must be one of {', '.join(map(str, expected))}, got {_describe(value)}"
    elif kind in _BOUND_WORDS:
        yield path, f"must be {_BOUND_WORDS[kind]} {expected}, got {_short(value)}"
    else:
        yield path, error.message


_BOUND_WORDS = {
    "minimum": ">=",
    "maximum": "<=",
    "exclusiveMinimum": ">",
    "exclusiveMaximum": "<",
    "minLength": "a string of length >=",
    "maxLength": "a string of length <=",
    "minItems": "a list of length >=",
    "maxItems": "a list of length <=",
}


def _type_words(expected: str | list[str]) -> str:
    names = {"object": "a mapping", "array": "a list", "integer": "an integer",
             "number": "a number", "string": "a string", "boolean": "true or false",
             "null": "nothing"}
    kinds = [expected] if isinstance(expected, str) else expected
    return " or ".join(names.get(k, k) for k in kinds)


def _describe(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string",
             list: "list", dict: "mapping", type(None): "nothing"}
    kind = kinds.get(type(value), type(value).__name__)
    return kind if isinstance(value, list | dict) or value is None else f"{kind} {_short(value)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _non_finite(data: Any, path: KeyPath = ()) -> Iterator[KeyPath]:
    """Paths of .nan / .inf floats, which slip past schema bounds (nan compares false)."""
    if isinstance(data, float) and not math.isfinite(data):
        yield path
    elif isinstance(data, dict):
        for key, value in data.items():
            yield from _non_finite(value, (*path, str(key)))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _non_finite(value, (*path, i))


def _cross_field_problems(config: Config) -> list[tuple[KeyPath, str]]:
    """Rules spanning several keys, which a JSON schema cannot state."""
    out: list[tuple[KeyPath, str]] = []
    policy = config.policy
    if policy.cold_threshold >= policy.hot_threshold:
        out.append((("policy", "cold_threshold"),
                    f"must be below policy.hot_threshold ({policy.hot_threshold}),"
                    f" got {policy.cold_threshold}"))
    split = policy.budget_split
    if not math.isclose(split.promote + split.demote, 1.0, abs_tol=1e-9):
        out.append((("policy", "budget_split"),
                    f"promote + demote must be 1, got {split.promote} + {split.demote}"))
    damon = config.collectors.damon
    if damon.aggregation_interval < damon.sampling_interval:
        out.append((("collectors", "damon", "aggregation_interval"),
                    f"must be >= collectors.damon.sampling_interval ({damon.sampling_interval})"))
    out += _address_problems(config.metrics)
    return out


def _address_problems(metrics: MetricsConfig) -> list[tuple[KeyPath, str]]:
    try:
        address = ipaddress.ip_address(metrics.address)
    except ValueError:
        return [(("metrics", "address"), f"must be an IP address, got {_short(metrics.address)}")]
    if metrics.enabled and not metrics.allow_remote and not address.is_loopback:
        return [(("metrics", "address"),
                 f"{address} is not a loopback address; set metrics.allow_remote: true"
                 " to expose metrics beyond this host")]
    return []


# --- building the dataclass tree -------------------------------------------------


def _build(cls: type, data: dict[str, Any]) -> Any:
    """Instantiate dataclass `cls` from validated data; missing keys take defaults."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        default = getattr(cls(), f.name)
        if is_dataclass(default):
            kwargs[f.name] = _build(type(default), value)
        elif isinstance(default, tuple):
            kwargs[f.name] = tuple(value)
        elif isinstance(default, float):
            kwargs[f.name] = float(value)
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def parse(data: bytes, file: Path | str = "<config>") -> Config:
    """Validate YAML bytes into a Config, or raise ConfigError naming every problem."""
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(file, [Problem((), f"larger than {MAX_FILE_BYTES} bytes", None)])
    doc = _parse_yaml(data, file)
    problems = [Problem(p, "must be a finite number", _line_for(doc.lines, p))
                for p in _non_finite(doc.value)]
    problems += _schema_problems(doc.value, doc.lines)
    if problems:
        raise ConfigError(file, sorted(problems, key=lambda p: (p.line or 0, dotted(p.path))))
    config: Config = _build(Config, doc.value)
    cross = _cross_field_problems(config)
    if cross:
        raise ConfigError(file, [Problem(p, r, _line_for(doc.lines, p)) for p, r in cross])
    return config


def _parse_yaml(data: bytes, file: Path | str) -> _Document:
    """The YAML document, or ConfigError with the line (and key, once known)."""
    doc = _Document()
    try:
        doc.read(data)
        return doc
    except yaml.reader.ReaderError as e:
        reason = f"not valid UTF-8 or UTF-16 text at byte {e.position}: {e.reason}"
        raise ConfigError(file, [Problem((), reason, None)]) from None
    except (_YamlProblem, yaml.YAMLError) as e:
        known: KeyPath = ()
        if isinstance(e, _YamlProblem):
            mark, reason, known = e.mark, e.reason, e.path
        else:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            words = [str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None))]
            reason = "not valid YAML: " + " ".join(w for w in words if w != "None")
        path = known or doc.path_at(mark) or _open_path(data)
        raise ConfigError(file, [Problem(path, reason, mark.line + 1 if mark else None)]) from None


def _open_path(data: bytes) -> KeyPath:
    """The key path the parser was inside when the YAML syntax broke.

    Replays the parser's events up to the error: each open mapping contributes
    the key whose value is being read, each open list the item's index.
    """
    # per open container: [is_mapping, current key or index, awaiting a key]
    stack: list[list[Any]] = []
    try:
        for event in yaml.parse(data, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                if len(stack) >= MAX_DEPTH:
                    break  # the parser slows with depth; the error is at a key already open
                _value_seen(stack, None)
                stack.append([isinstance(event, yaml.MappingStartEvent), -1, True])
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                stack.pop()
                if stack and stack[-1][0]:
                    stack[-1][2] = True  # the mapping's value is complete
            elif isinstance(event, yaml.ScalarEvent | yaml.AliasEvent):
                _value_seen(stack, getattr(event, "value", None))
    except yaml.YAMLError:
        pass
    return tuple(key for is_map, key, awaiting in stack if not (is_map and awaiting))


def _value_seen(stack: list[list[Any]], scalar: str | None) -> None:
    """Account for a node starting inside the innermost open container."""
    if not stack:
        return
    top = stack[-1]
    if not top[0]:
        top[1] += 1  # the next list item
    elif top[2]:
        top[1], top[2] = str(scalar), False  # a key: its value comes next
    elif scalar is not None:
        top[2] = True  # a scalar value completes the pair


def load(path: Path | str) -> Config:
    """Read and validate the config file at `path`."""
    path = Path(path)
    try:
        data = _read_regular(path)
    except OSError as e:
        raise ConfigError(path, [Problem((), f"cannot read: {e.strerror or e}", None)]) from None
    except ValueError as e:
        raise ConfigError(path, [Problem((), str(e), None)]) from None
    return parse(data, path)


def _read_regular(path: Path) -> bytes:
    """The file's bytes; ValueError for a FIFO, device or directory, or an oversized file."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        return f.read(MAX_FILE_BYTES + 1)


# --- the running config -----------------------------------------------------------


@dataclass(frozen=True)
class ReloadStatus:
    """Outcome of the last load or reload (swapped whole, so readers see a consistent pair)."""

    successful: bool
    success_timestamp: float  # wall-clock time of the last successful load
    error: str | None  # the last failure's message, None after a success


class ConfigStore:
    """The daemon's current config: reload keeps the old one when the new one is bad.

    The first load raises ConfigError (a daemon must not start half-configured);
    reload() never raises for a bad file, it records the failure instead.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._config = load(self.path)
        self._status = ReloadStatus(True, time.time(), None)

    @property
    def config(self) -> Config:
        return self._config

    @property
    def status(self) -> ReloadStatus:
        return self._status

    def reload(self) -> bool:
        """Re-read the file; True if the new config is now current."""
        with self._lock:
            try:
                config = load(self.path)
            except ConfigError as e:
                self._status = ReloadStatus(False, self._status.success_timestamp, str(e))
                return False
            self._config = config
            self._status = ReloadStatus(True, time.time(), None)
            return True
