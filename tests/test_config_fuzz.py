"""Fuzzing tierd.config: whatever the file holds, the result is a Config or a ConfigError.

Never another exception (a traceback), and never a half-built config: a
wrong value anywhere is refused with its key named.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierd import cli, config

FUZZ = settings(deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

DEFAULTS = dataclasses.asdict(config.Config())


def leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += leaves(value, (*prefix, key))
        else:
            out.append(((*prefix, key), value))
    return out


LEAVES = leaves(DEFAULTS)


def outcome(data: bytes) -> config.Config | config.ConfigError:
    try:
        return config.parse(data, "fuzz.yaml")
    except config.ConfigError as e:
        return e


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    result = outcome(data)
    if isinstance(result, config.ConfigError):
        assert str(result).startswith("fuzz.yaml")
        assert result.problems


YAML_TOKENS = [*"abcxyz_0189:-[]{},.&*!|>'\"#%?@` \n\t",
               "interval", "policy", "movers", "hot_threshold", "  ", "\n  ", "- ", ": ",
               "!!python/object:os.system", "!!int", "&a ", "*a", "---", "..."]
yaml_ish_text = st.lists(st.sampled_from(YAML_TOKENS), max_size=120).map("".join)


@FUZZ
@given(yaml_ish_text)
def test_yaml_looking_text(text: str) -> None:
    result = outcome(text.encode())
    assert isinstance(result, config.Config | config.ConfigError)


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.text(max_size=20), st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.text(max_size=10) | st.sampled_from([k[-1] for k, _ in LEAVES]),
                    inner, max_size=4)), max_leaves=20)


def with_leaf(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return tree


@FUZZ
@given(st.sampled_from(LEAVES), values)
def test_any_value_at_any_key(leaf: tuple[tuple[str, ...], Any], value: Any) -> None:
    path, _ = leaf
    result = outcome(yaml.safe_dump(with_leaf(path, value)).encode())
    if isinstance(result, config.Config):
        # accepted: the value is there, exactly, and nothing else changed
        got = dataclasses.asdict(result)
        expected = with_leaf(path, value)
        node, want = got, expected
        for key in path:
            node, want = node[key], want[key]
        assert node == (tuple(want) if isinstance(want, list) else want)
    else:
        # A cross-field rule names its other key: a sampling interval above the
        # default aggregation interval is reported on aggregation_interval.
        named = (path, CROSS_FIELD_PARTNERS.get(path, path))
        assert any(p.path[:len(want)] == want or p.path == want[:len(p.path)]
                   for p in result.problems for want in named), str(result)


CROSS_FIELD_PARTNERS = {
    ("policy", "hot_threshold"): ("policy", "cold_threshold"),
    ("collectors", "damon", "sampling_interval"): ("collectors", "damon", "aggregation_interval"),
}


def wrong_type_for(default: Any) -> st.SearchStrategy[Any]:
    """Values no schema entry for a leaf with this default accepts."""
    if isinstance(default, bool):
        return st.one_of(st.integers(), st.text(), st.none(), st.lists(st.booleans()))
    if isinstance(default, int | float):
        return st.one_of(st.text(), st.booleans(), st.none(), st.lists(st.integers()),
                         st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
    if isinstance(default, str):
        return st.one_of(st.integers(), st.floats(), st.booleans(), st.none(),
                         st.lists(st.text()))
    return st.one_of(st.integers(), st.text(min_size=1), st.booleans(),
                     st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


TRUE_FALSE_OR_AUTO = {("collectors", "damon", "enabled"), ("movers", "move_all_shared")}


@st.composite
def wrongly_typed_config(draw: st.DrawFn) -> tuple[tuple[str, ...], bytes]:
    path, default = draw(st.sampled_from(LEAVES))
    # These take true, false or auto: no boolean is wrong there.
    value = draw(wrong_type_for(default).filter(
        lambda v: not (path in TRUE_FALSE_OR_AUTO and isinstance(v, bool))))
    return path, yaml.safe_dump(with_leaf(path, value)).encode()


@FUZZ
@given(case=wrongly_typed_config())
def test_wrong_type_exits_78_naming_the_key(case: tuple[tuple[str, ...], bytes],
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, data = case
    file = tmp_path / "tierd.yaml"
    file.write_bytes(data)
    assert cli.main(["check-config", str(file)]) == 78
    err = capsys.readouterr().err
    assert f": {config.dotted(path)}" in err
    assert "Traceback" not in err


@FUZZ
@given(st.sampled_from(LEAVES), st.text(min_size=1, max_size=12).filter(
    lambda k: k not in {key[-1] for key, _ in LEAVES}))
def test_unknown_key_anywhere_is_named(leaf: tuple[tuple[str, ...], Any], extra: str) -> None:
    parent = leaf[0][:-1]
    tree = with_leaf((*parent, extra), 1)
    result = outcome(yaml.safe_dump(tree).encode())
    assert isinstance(result, config.ConfigError)
    assert (*parent, extra) in [p.path for p in result.problems]


# --- hostile shapes: non-string keys, deep nesting, long lists ----------------------------

# Per case: a refusal (or a config) in bounded time and memory, however the file is built.
# The bounds are an order of magnitude above what a linear parse of 64 KiB needs and far
# below what the quadratic and re-parsing paths took (tens of seconds, hundreds of MB).
CASE_SECONDS = 10.0
CASE_BYTES = 64 << 20

keys = st.one_of(st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False),
                 st.text(max_size=8), st.sampled_from([k[-1] for k, _ in LEAVES]))
list_items = st.one_of(st.integers(), st.text(max_size=6))


@st.composite
def hostile_yaml(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["keys", "flow_depth", "block_depth", "list", "mixed"]))
    if kind == "keys":
        tree = draw(st.dictionaries(keys, st.integers() | st.text(max_size=4), max_size=40))
        return yaml.safe_dump(tree).encode()
    if kind == "flow_depth":
        depth = draw(st.integers(0, 30_000))
        return (draw(st.sampled_from(["", "policy: ", "exclusions: {pids: "])) + "[" * depth
                + "]" * draw(st.integers(0, depth))).encode()
    if kind == "block_depth":
        depth = draw(st.integers(0, 200))
        return "".join(" " * i + f"k{i}:\n" for i in range(depth)).encode()
    items = draw(st.lists(list_items, max_size=50)) * draw(st.integers(1, 800))
    if kind == "mixed":
        return ("exclusions:\n  comms: " + yaml.safe_dump(items, default_flow_style=True)).encode()
    return yaml.safe_dump({"exclusions": {"pids": items}}).encode()


@settings(deadline=None, max_examples=60)
@given(hostile_yaml())
def test_hostile_shapes_are_refused_in_bounded_time_and_memory(data: bytes) -> None:
    import time
    import tracemalloc
    tracemalloc.start()
    started = time.process_time()
    try:
        result = outcome(data)
        seconds = time.process_time() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, config.Config | config.ConfigError)
    assert seconds < CASE_SECONDS and peak < CASE_BYTES, (len(data), seconds, peak)
    if isinstance(result, config.ConfigError):
        assert len(str(result)) <= (config.MAX_PROBLEMS_SHOWN + 1) * (config.MAX_LINE_CHARS + 1)
