"""tierd.config: the default tree, the shipped files, and every way a config is refused."""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tierd import cli, config
from tierd.config_schema import SCHEMA

REPO = Path(__file__).resolve().parent.parent
SHIPPED = [REPO / "config" / "tierd.yaml", *sorted((REPO / "config" / "examples").glob("*.yaml"))]


def check_config(tmp_path: Path, text: str | bytes, capsys: pytest.CaptureFixture[str]
                 ) -> tuple[int, str]:
    path = tmp_path / "tierd.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc = cli.main(["check-config", str(path)])
    out = capsys.readouterr()
    return rc, out.err


def test_empty_file_is_all_defaults() -> None:
    assert config.parse(b"") == config.Config()
    assert config.parse(b"# only a comment\n") == config.Config()


def test_shipped_default_file_spells_out_the_defaults_in_a_dry_run() -> None:
    shipped = config.load(REPO / "config" / "tierd.yaml")
    assert shipped.dry_run, "a fresh install must not move pages before a review"
    assert shipped == dataclasses.replace(config.Config(), dry_run=True)


def test_shipped_file_documents_a_one_line_switch_that_works(tmp_path: Path) -> None:
    """The sed line in the shipped file's comment turns the dry run off, and only that."""
    text = (REPO / "config" / "tierd.yaml").read_text()
    (command,) = re.findall(r"^#\s+(sed -i .*?) /etc/tierd/tierd.yaml", text, re.MULTILINE)
    path = tmp_path / "tierd.yaml"
    path.write_text(text)
    subprocess.run([*shlex.split(command), str(path)], check=True)
    assert config.load(path) == config.Config()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_are_valid(path: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"


def test_examples_differ_from_defaults_where_they_say() -> None:
    dry = config.load(REPO / "config" / "examples" / "dry-run.yaml")
    assert dry.dry_run and dry.collectors.damon.enabled is True
    two = config.load(REPO / "config" / "examples" / "two-sockets-two-cxl.yaml")
    assert two.collectors.idle.nodes == (0, 1, 2, 3)
    assert two.kernel_tiering == "refuse"


def test_values_are_typed_and_immutable() -> None:
    cfg = config.parse(b"interval: 2\nexclusions: {pids: [7, 9]}\nmovers: {rate_mb_per_s: 100}")
    assert cfg.interval == 2.0 and isinstance(cfg.interval, float)
    assert isinstance(cfg.movers.rate_mb_per_s, float)
    assert cfg.exclusions.pids == (7, 9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.interval = 3.0  # type: ignore[misc]


def test_schema_and_dataclasses_have_the_same_keys() -> None:
    def keys(schema: dict, prefix: str = "") -> set[str]:
        out = set()
        for name, sub in schema["properties"].items():
            out.add(prefix + name)
            if sub["type"] == "object":
                out |= keys(sub, f"{prefix}{name}.")
        return out

    def fields_of(obj: object, prefix: str = "") -> set[str]:
        out = set()
        for f in dataclasses.fields(obj):
            out.add(prefix + f.name)
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out |= fields_of(value, f"{prefix}{f.name}.")
        return out

    assert keys(SCHEMA) == fields_of(config.Config())


def test_defaults_pass_their_own_schema() -> None:
    assert config.parse(config_yaml(dataclasses.asdict(config.Config()))) == config.Config()


def config_yaml(data: dict) -> bytes:
    import yaml
    return yaml.safe_dump(data).encode()


def test_reference_doc_is_up_to_date() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "tierd", "check-config", "--print-reference"],
        check=True, capture_output=True, text=True, cwd=REPO).stdout
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert generated == committed, (
        "docs/configuration.md is stale: run"
        " `make docs`")


# (id, file content, text the message must contain, line it must name or None)
BAD_CONFIGS: list[tuple[str, str | bytes, str, int | None]] = [
    # unknown keys
    ("unknown top key", "intervall: 5\n", "intervall: unknown key", 1),
    ("unknown nested key", "policy:\n  hot: 3\n", "policy.hot: unknown key", 2),
    ("unknown deep key", "collectors:\n  idle:\n    enable: true\n",
     "collectors.idle.enable: unknown key", 3),
    ("unknown collector", "collectors:\n  ebpf: {}\n", "collectors.ebpf: unknown key", 2),
    ("unknown split key", "policy: {budget_split: {keep: 1}}", "budget_split.keep", 1),
    ("integer key", "1: 2\n", "1: keys are names, got integer 1", 1),
    ("integer and name keys", "1: 2\nfoo: 3\n", "1: keys are names, got integer 1", 1),
    ("boolean key", "policy: {true: 1}\n", "policy: keys are names, got boolean True", 1),
    ("yes as key", "metrics:\n  yes: 1\n", "metrics: keys are names, got boolean True", 2),
    # wrong types
    ("interval string", "interval: fast\n", "interval: expected a number", 1),
    ("interval bool", "interval: true\n", "interval: expected a number", 1),
    ("interval null", "interval:\n", "interval: expected a number", 1),
    ("interval list", "interval: [1]\n", "interval: expected a number", 1),
    ("dry_run string", "dry_run: 'no'\n", "dry_run: expected true or false", 1),
    ("dry_run int", "dry_run: 1\n", "dry_run: expected true or false", 1),
    ("section is a list", "policy: [1, 2]\n", "policy: expected a mapping", 1),
    ("section is a scalar", "movers: pid\n", "movers: expected a mapping", 1),
    ("section is null", "collectors:\n", "collectors: expected a mapping", 1),
    ("nodes not a list", "collectors: {idle: {nodes: 0}}",
     "collectors.idle.nodes: expected a list", 1),
    ("node not int", "collectors:\n  idle:\n    nodes: [0, one]\n",
     "collectors.idle.nodes[1]: expected an integer", 3),
    ("node float", "collectors: {idle: {nodes: [1.5]}}", "collectors.idle.nodes[0]", 1),
    ("batch float", "movers: {batch_pages: 1.5}", "movers.batch_pages: expected an integer", 1),
    ("pid string", "exclusions: {pids: ['1']}", "exclusions.pids[0]: expected an integer", 1),
    ("comm int", "exclusions: {comms: [5]}", "exclusions.comms[0]: expected a string", 1),
    ("address int", "metrics: {address: 127}", "metrics.address: expected a string", 1),
    ("port string", "metrics: {port: http}", "metrics.port: expected an integer", 1),
    ("timestamp value", "interval: 2001-12-14\n", "interval: expected a number", 1),
    ("binary value", "interval: !!binary aGVsbG8=\n", "interval: expected a number", 1),
    # out of range
    ("interval zero", "interval: 0\n", "interval: must be >= 0.1", 1),
    ("interval negative", "interval: -5\n", "interval: must be >= 0.1", 1),
    ("interval huge", "interval: 1.0e+300\n", "interval: must be <= 3600", 1),
    ("interval bignum", "interval: " + "9" * 4000 + "\n", "interval: must be <= 3600", 1),
    ("int beyond digit limit", "interval: " + "9" * 5000 + "\n", "interval: cannot read '99999", 1),
    ("empty explicit int", "interval: !!int\n", "interval: cannot read '' as int", 1),
    ("bad explicit bool", "dry_run: !!bool maybe\n", "dry_run: cannot read 'maybe' as bool", 1),
    ("interval nan", "interval: .nan\n", "interval: must be a finite number", 1),
    ("interval inf", "interval: .inf\n", "interval: must be a finite number", 1),
    ("threshold -inf", "policy: {cold_threshold: -.inf}", "policy.cold_threshold", 1),
    ("decay one", "policy:\n  heat_decay: 1\n", "policy.heat_decay: must be < 1", 2),
    ("decay negative", "policy: {heat_decay: -0.1}", "policy.heat_decay: must be >= 0", 1),
    ("hot zero", "policy: {hot_threshold: 0}", "policy.hot_threshold: must be > 0", 1),
    ("hysteresis zero", "policy: {hysteresis_intervals: 0}", "policy.hysteresis_intervals", 1),
    ("headroom 90", "policy: {headroom_percent: 90}", "policy.headroom_percent: must be <= 50", 1),
    ("share above one", "policy: {budget_split: {promote: 1.5, demote: -0.5}}",
     "policy.budget_split.promote: must be <= 1", 1),
    ("batch zero", "movers: {batch_pages: 0}", "movers.batch_pages: must be >= 1", 1),
    ("rate zero", "movers: {rate_mb_per_s: 0}", "movers.rate_mb_per_s: must be > 0", 1),
    ("port zero", "metrics: {port: 0}", "metrics.port: must be >= 1", 1),
    ("port too big", "metrics: {port: 70000}", "metrics.port: must be <= 65535", 1),
    ("pid zero", "exclusions: {pids: [0]}", "exclusions.pids[0]: must be >= 1", 1),
    ("node negative", "collectors: {idle: {nodes: [-1]}}", "collectors.idle.nodes[0]", 1),
    ("sample period tiny", "collectors: {perf: {sample_period: 1}}",
     "collectors.perf.sample_period: must be >= 1000", 1),
    ("scan rate tiny", "collectors: {idle: {pfns_per_second: 10}}", "pfns_per_second", 1),
    ("damon sampling zero", "collectors: {damon: {sampling_interval: 0}}",
     "collectors.damon.sampling_interval", 1),
    ("empty comm", "exclusions: {comms: ['']}", "exclusions.comms[0]", 1),
    ("relative cgroup", "exclusions: {cgroups: [system.slice]}", "exclusions.cgroups[0]", 1),
    ("event with space", "collectors: {perf: {events: ['a b']}}", "collectors.perf.events[0]", 1),
    ("duplicate nodes", "collectors: {idle: {nodes: [0, 0]}}", "collectors.idle.nodes", 1),
    ("too many events", "collectors: {perf: {events: [" + ",".join(
        f"e{i}" for i in range(20)) + "]}}", "collectors.perf.events", 1),
    # bad enums
    ("mover kind", "movers:\n  kind: magic\n", "movers.kind: must be one of auto, phys, pid", 2),
    ("backend", "collectors: {perf: {backend: BCC}}", "collectors.perf.backend: must be one of", 1),
    ("stance", "kernel_tiering: ignore\n", "kernel_tiering: must be one of coexist, warn", 1),
    ("stance bool", "kernel_tiering: off\n", "kernel_tiering: expected a string", 1),
    # impossible combinations
    ("cold above hot", "policy:\n  hot_threshold: 1\n  cold_threshold: 2\n",
     "policy.cold_threshold: must be below policy.hot_threshold", 3),
    ("cold equals hot", "policy: {hot_threshold: 2, cold_threshold: 2}", "cold_threshold", 1),
    ("cold above default hot", "policy:\n  cold_threshold: 5\n", "policy.cold_threshold", 2),
    ("split sums below one", "policy:\n  budget_split:\n    promote: 0.2\n    demote: 0.2\n",
     "policy.budget_split: promote + demote must be 1", 2),
    ("split partly given", "policy: {budget_split: {promote: 0.9}}", "policy.budget_split", 1),
    ("damon aggregation below sampling",
     "collectors: {damon: {sampling_interval: 1, aggregation_interval: 0.5}}",
     "collectors.damon.aggregation_interval", 1),
    ("remote metrics", "metrics:\n  address: 0.0.0.0\n",
     "metrics.address: 0.0.0.0 is not a loopback", 2),
    ("remote metrics v6", "metrics: {address: '::'}", "metrics.address", 1),
    ("hostname address", "metrics: {address: example.org}", "metrics.address: must be an IP", 1),
    ("address junk", "metrics: {address: '127.0.0.1; rm -rf /'}", "metrics.address", 1),
    # hostile or broken YAML
    ("top level list", "- interval: 5\n", "expected a mapping, got list", 1),
    ("top level scalar", "hello\n", "expected a mapping, got string 'hello'", 1),
    ("top level int", "42\n", "expected a mapping", 1),
    ("duplicate top key", "interval: 5\ndry_run: true\ninterval: 6\n",
     "duplicate key 'interval'", 3),
    ("duplicate nested key", "policy:\n  hot_threshold: 5\n  hot_threshold: 6\n",
     "duplicate key 'policy.hot_threshold'", 3),
    ("alias", "policy: &p {hot_threshold: 5}\nmovers: *p\n",
     "YAML aliases (*p) are not allowed", 2),
    ("billion laughs", "a: &a [x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)},"
               f" *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9)),
     "YAML aliases", 2),
    ("merge key alias", "base: &b {port: 1}\nmetrics:\n  <<: *b\n", "YAML aliases", 3),
    ("python object tag", "interval: !!python/object/apply:os.system ['true']\n",
     "interval: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed", 1),
    ("python name tag", "!!python/name:os.system\n", "python/name:os.system' is not allowed", 1),
    ("custom tag", "movers:\n  kind: !fast pid\n", "movers.kind: tag '!fast' is not allowed", 2),
    ("tag on a key", "!!python/object:x interval: 5\n", "is not allowed", 1),
    ("unclosed bracket", "policy: {hot_threshold: 5\n", "policy: not valid YAML", 2),
    ("unclosed list", "collectors:\n  idle:\n    nodes: [0, 1\n  perf: {}\n",
     "collectors.idle.nodes[1]: not valid YAML", 4),
    ("unclosed quote", "movers:\n  kind: \"pid\n", "movers.kind: not valid YAML", 3),
    ("colon in list item", "exclusions:\n  comms:\n    - a\n    - b: c: d\n",
     "exclusions.comms[1]: not valid YAML: mapping values are not allowed", 4),
    ("bad indentation", "policy:\n  hot_threshold: 5\n bad: 1\n", "not valid YAML", 3),
    ("tab indentation", "policy:\n\thot_threshold: 5\n", "policy: not valid YAML", 2),
    ("two documents", "interval: 5\n---\ninterval: 6\n", "not valid YAML", 2),
    ("unhashable key", "? [a, b]\n: 1\n", "keys are names, got a list or mapping", 1),
    ("deep nesting", "policy: " + "[" * 200 + "]" * 200 + "\n", "nested too deeply", 1),
    ("invalid utf-8", b"interval: 5\n# caf\xe9\n", "not valid UTF-8", None),
    ("utf-16 without bom", "interval: 5\n".encode("utf-16-le"), "not valid UTF-8", None),
    ("utf-16 with bom", "interval: x\n".encode("utf-16"), "interval: expected a number", 1),
    ("control character", b"interval: 5\x07\n", "not valid UTF-8 or UTF-16 text", None),
    ("nul byte", b"interval: \x00\n", "not valid UTF-8 or UTF-16 text", None),
    ("huge file", "# x\n" * 300_000, "larger than", None),
]


@pytest.mark.parametrize(("text", "needle", "line"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_exits_78_naming_file_line_and_key(
        text: str | bytes, needle: str, line: int | None, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = check_config(tmp_path, text, capsys)
    assert rc == 78
    assert needle in err
    where = f"{tmp_path / 'tierd.yaml'}:{line}: " if line else f"{tmp_path / 'tierd.yaml'}: "
    assert any(row.startswith(where) for row in err.splitlines()), err
    assert "Traceback" not in err


def test_there_are_at_least_fifty_bad_configs() -> None:
    assert len(BAD_CONFIGS) >= 50


def test_every_problem_is_reported_at_once(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = check_config(tmp_path, "interval: -1\nmovers:\n  kind: x\n  typo: 1\n", capsys)
    assert rc == 78
    rows = err.splitlines()
    assert [r.split(": ")[1] for r in rows] == ["interval", "movers.kind", "movers.typo"]


def test_missing_file_is_a_config_error(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    assert cli.main(["check-config", str(missing)]) == 78
    assert f"{missing}: cannot read: No such file or directory" in capsys.readouterr().err


def test_directory_is_a_config_error(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check-config", str(tmp_path)]) == 78
    assert "cannot read" in capsys.readouterr().err


def test_command_line_exit_status_and_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy:\n  hot_threshold: -1\n")
    proc = subprocess.run([sys.executable, "-m", "tierd", "check-config", str(bad)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 78
    assert proc.stderr == f"{bad}:2: policy.hot_threshold: must be > 0, got -1\n"
    good = subprocess.run([sys.executable, "-m", "tierd", "check-config", str(SHIPPED[0])],
                          capture_output=True, text=True, cwd=REPO)
    assert good.returncode == 0


class TestConfigStore:
    def test_first_load_fails_loudly(self, tmp_path: Path) -> None:
        path = tmp_path / "tierd.yaml"
        path.write_text("interval: nope\n")
        with pytest.raises(config.ConfigError, match="interval: expected a number"):
            config.ConfigStore(path)

    def test_reload_applies_a_good_file(self, tmp_path: Path) -> None:
        path = tmp_path / "tierd.yaml"
        path.write_text("interval: 5\n")
        store = config.ConfigStore(path)
        first = store.status.success_timestamp
        path.write_text("interval: 7\n")
        assert store.reload() is True
        assert store.config.interval == 7.0
        assert store.status.successful and store.status.error is None
        assert store.status.success_timestamp >= first

    def test_bad_reload_keeps_the_old_config(self, tmp_path: Path) -> None:
        path = tmp_path / "tierd.yaml"
        path.write_text("interval: 5\n")
        store = config.ConfigStore(path)
        before = store.status.success_timestamp
        path.write_text("interval: 7\nmovers: {kind: teleport}\n")
        assert store.reload() is False
        assert store.config.interval == 5.0
        assert not store.status.successful
        assert store.status.success_timestamp == before
        assert "movers.kind: must be one of" in store.status.error
        path.write_text("interval: 9\n")
        assert store.reload() is True
        assert store.config.interval == 9.0 and store.status.successful

    def test_deleted_file_on_reload_keeps_the_old_config(self, tmp_path: Path) -> None:
        path = tmp_path / "tierd.yaml"
        path.write_text("dry_run: true\n")
        store = config.ConfigStore(path)
        path.unlink()
        assert store.reload() is False
        assert store.config.dry_run is True
        assert "cannot read" in store.status.error


def test_tree_in_the_module_docstring_is_the_defaults() -> None:
    doc = config.__doc__
    tree = doc[doc.index("\n\n", doc.index("The tree")) + 2:doc.index("`load(path)`")]
    assert config.parse(textwrap.dedent(tree).encode()) == config.Config()


def test_shipped_comments_name_only_exported_metrics() -> None:
    """A metric named in a shipped file's comment is one tierd exports."""
    exported = (REPO / "docs" / "metrics.md").read_text()
    for path in SHIPPED:
        for name in set(re.findall(r"\btierd_[a-z_]+", path.read_text())):
            assert f"`{name}" in exported or f"`{name.removesuffix('_total')}" in exported, \
                (path.name, name)
