"""The Prometheus endpoint: values from a state fixture, promtool, and a real Prometheus scrape."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_fixture import (
    DEMOTED_PAGES,
    GIB,
    HOT_ON_FAST,
    HOT_ON_SLOW,
    PROMOTED_PAGES,
    failed_reload,
    populated_state,
)

import tierd
from tierd import config
from tierd.config import ReloadStatus
from tierd.errors import TierdError
from tierd.service.metrics import MetricsServer
from tierd.telemetry import DaemonState

ALLOWED_LABELS = {"node", "tier", "source_node", "target_node", "direction", "reason", "stage",
                  "collector", "state", "mover", "version", "revision", "pythonversion", "le",
                  "heat", "source"}


def ok_reload() -> ReloadStatus:
    return ReloadStatus(True, 1_700_000_000.0, None)


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    srv = MetricsServer(populated_state(), failed_reload, lambda: 5.0, port=0).start()
    yield srv
    srv.stop()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def test_moves_by_direction_and_node_pair(server: MetricsServer) -> None:
    text = get(server.url + "/metrics")
    assert value(text, "tierd_moved_pages_total", direction="promote", source_node="1",
                 target_node="0") == PROMOTED_PAGES
    assert value(text, "tierd_moved_bytes_total", direction="promote", source_node="1",
                 target_node="0") == PROMOTED_PAGES * 4096
    assert value(text, "tierd_moved_pages_total", direction="demote", source_node="0",
                 target_node="1") == DEMOTED_PAGES
    assert value(text, "tierd_migration_attempts_total", direction="promote", source_node="1",
                 target_node="0") == PROMOTED_PAGES + 25
    assert value(text, "tierd_migration_failures_total", reason="EBUSY") == 20
    assert value(text, "tierd_excluded_pages_total", reason="mlocked") == 7
    assert value(text, "tierd_rate_limit_hits_total") == 1
    assert value(text, "tierd_rate_limited_pages_total") == 64
    assert value(text, "tierd_samples_total") == 5000
    assert value(text, "tierd_samples_lost_total") == 12


def test_memory_per_node_and_per_tier(server: MetricsServer) -> None:
    text = get(server.url + "/metrics")
    assert value(text, "tierd_node_memory_total_bytes", node="0", tier="4") == 2 * GIB
    assert value(text, "tierd_node_memory_used_bytes", node="0", tier="4") == 1.5 * GIB
    assert value(text, "tierd_node_memory_free_bytes", node="1", tier="54") == 1.5 * GIB
    assert value(text, "tierd_tier_memory_used_bytes", tier="54") == 0.5 * GIB
    assert value(text, "tierd_node_memory_keep_free_bytes", node="0", tier="4") == GIB / 4
    assert value(text, "tierd_tier_memory_keep_free_bytes", tier="54") == GIB / 8
    assert value(text, "tierd_node_tier_rank", node="0", tier="4") == 0
    assert value(text, "tierd_node_tier_rank", node="1", tier="54") == 1


def test_placement_bytes_per_heat_class_and_node(server: MetricsServer) -> None:
    text = get(server.url + "/metrics")
    assert value(text, "tierd_placement_bytes", node="0", tier="4", heat="hot") == HOT_ON_FAST
    assert value(text, "tierd_placement_bytes", node="1", tier="54", heat="hot") == HOT_ON_SLOW
    assert value(text, "tierd_placement_bytes", node="1", tier="54", heat="cold") == GIB / 4
    assert value(text, "tierd_placement_bytes", node="1", tier="54", heat="warm") == 0


def test_errors_by_source_count_every_error(server: MetricsServer) -> None:
    text = get(server.url + "/metrics")
    assert value(text, "tierd_errors_total", source="rmap") == 10
    assert value(text, "tierd_errors_total", source="mover:pid") == 1
    assert value(text, "tierd_errors_total", source="collect") == 1  # an interval cut short


def test_build_info_names_the_revision(server: MetricsServer) -> None:
    from tierd.build import git_revision

    (labels,) = [dict(labels) for name, labels in samples(get(server.url + "/metrics"))
                 if name == "tierd_build_info"]
    assert labels["version"] == tierd.__version__
    assert labels["revision"] == (git_revision(REPO) or "unknown")
    assert labels["revision"] != "unknown" or not (REPO / ".git").exists()


def test_one_direction_label_instead_of_per_direction_names(server: MetricsServer) -> None:
    names = {name for name, _ in samples(get(server.url + "/metrics"))}
    assert not {n for n in names if "promoted" in n or "demoted" in n}


def test_durations_are_cumulative_histograms(server: MetricsServer) -> None:
    text = get(server.url + "/metrics")
    assert value(text, "tierd_stage_duration_seconds_bucket", stage="collect", le="0.005") == 1
    assert value(text, "tierd_stage_duration_seconds_bucket", stage="collect", le="0.05") == 2
    assert value(text, "tierd_stage_duration_seconds_bucket", stage="collect", le="+Inf") == 3
    assert value(text, "tierd_stage_duration_seconds_count", stage="collect") == 3
    assert value(text, "tierd_stage_duration_seconds_sum", stage="collect") == pytest.approx(0.234)


def test_stage_cpu_is_a_counter_apart_from_the_durations(server: MetricsServer) -> None:
    text = get(server.url + "/metrics")
    assert value(text, "tierd_stage_cpu_seconds_total", stage="collect") == pytest.approx(0.117)
    assert value(text, "tierd_stage_cpu_seconds_total", stage="policy") == 0


def test_daemon_health_reload_and_build_info(server: MetricsServer) -> None:
    text = get(server.url + "/metrics")
    assert value(text, "tierd_config_last_reload_successful") == 0
    assert value(text, "tierd_config_last_reload_success_timestamp_seconds") < time.time() - 500
    assert value(text, "tierd_dry_run") == 0
    assert value(text, "tierd_collector_state", collector="perf", state="disabled") == 1
    assert value(text, "tierd_collector_state", collector="perf", state="ok") == 0
    assert value(text, "tierd_collector_state", collector="idle", state="ok") == 1
    assert value(text, "tierd_interval_seconds") == 5
    assert value(text, "tierd_intervals_total") == 1
    assert any(name == "tierd_build_info" for name, _ in samples(text))


def test_labels_are_bounded_and_hold_no_addresses(server: MetricsServer) -> None:
    text = get(server.url + "/metrics")
    for name, labels in samples(text):
        if name.startswith("tierd_"):
            assert {k for k, _ in labels} <= ALLOWED_LABELS, name
            for _, v in labels:
                assert not re.fullmatch(r"0x[0-9a-f]+|\d{6,}", v), (name, v)


def test_dry_run_counts_what_would_move() -> None:
    state = populated_state(dry_run=True)
    srv = MetricsServer(state, ok_reload, lambda: 5.0, port=0).start()
    try:
        text = get(srv.url + "/metrics")
    finally:
        srv.stop()
    assert value(text, "tierd_dry_run") == 1
    assert value(text, "tierd_dry_run_pages_total", direction="promote", source_node="1",
                 target_node="0") == PROMOTED_PAGES
    assert ("tierd_moved_pages_total", frozenset({("direction", "promote"), ("source_node", "1"),
                                                  ("target_node", "0")})) not in samples(text)


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)


def test_promtool_finds_nothing_to_lint(server: MetricsServer) -> None:
    result = promtool_check(get(server.url + "/metrics"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_promtool_on_a_fresh_daemon() -> None:
    srv = MetricsServer(DaemonState(), ok_reload, lambda: 5.0, port=0).start()
    try:
        result = promtool_check(get(srv.url + "/metrics"))
    finally:
        srv.stop()
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_would_catch_a_bad_name() -> None:
    """The lint above is live: a counter without _total is reported."""
    bad = "# HELP tierd_moves Moves.\n# TYPE tierd_moves counter\ntierd_moves 1\n"
    assert promtool_check(bad).returncode != 0


def test_default_bind_is_loopback() -> None:
    assert config.Config().metrics.address == "127.0.0.1"
    srv = MetricsServer(DaemonState(), ok_reload, lambda: 5.0, port=0)
    try:
        assert srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.stop()


def test_port_in_use_is_a_clear_error() -> None:
    first = MetricsServer(DaemonState(), ok_reload, lambda: 5.0, port=0)
    try:
        with pytest.raises(TierdError, match=rf"cannot listen on 127.0.0.1 port {first.port}"):
            MetricsServer(DaemonState(), ok_reload, lambda: 5.0, port=first.port)
    finally:
        first.stop()


def test_reload_status_follows_the_config_store(tmp_path: Path) -> None:
    path = tmp_path / "tierd.yaml"
    path.write_text("interval: 5\n")
    store = config.ConfigStore(path)
    srv = MetricsServer(DaemonState(), lambda: store.status, lambda: store.config.interval,
                        port=0).start()
    try:
        assert value(get(srv.url + "/metrics"), "tierd_config_last_reload_successful") == 1
        loaded = value(get(srv.url + "/metrics"),
                       "tierd_config_last_reload_success_timestamp_seconds")
        path.write_text("interval: [5]\n")
        store.reload()
        text = get(srv.url + "/metrics")
        assert value(text, "tierd_config_last_reload_successful") == 0
        assert value(text, "tierd_config_last_reload_success_timestamp_seconds") == loaded
        assert value(text, "tierd_interval_seconds") == 5
    finally:
        srv.stop()


def healthz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def test_healthz_fails_when_the_last_interval_is_stale() -> None:
    from tierd.service.status_page import STALE_INTERVALS

    state = populated_state()  # its one interval just finished
    srv = MetricsServer(state, ok_reload, lambda: 5.0, port=0).start()
    try:
        code, body = healthz(srv.url)
        assert code == 200 and body.startswith("ok: last interval"), body
        state.last_interval_at = time.time() - STALE_INTERVALS * 5.0 + 3
        assert healthz(srv.url)[0] == 200  # within a few slow intervals
        state.last_interval_at = time.time() - STALE_INTERVALS * 5.0 - 1
        code, body = healthz(srv.url)
        assert code == 503 and body.startswith("stale: last interval"), body
        assert "tierd_intervals_total" in get(srv.url + "/metrics")  # /metrics still answers
    finally:
        srv.stop()


def test_healthz_counts_from_the_start_until_the_first_interval() -> None:
    from tierd.service.status_page import liveness

    snap = DaemonState().snapshot()
    assert liveness(snap, 5.0, now=1000.0, since=990.0)[0]
    alive, why = liveness(snap, 5.0, now=1000.0, since=970.0)
    assert not alive and "no interval yet" in why


def test_unknown_path_is_404(server: MetricsServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        get(server.url + "/debug")
    e.value.close()  # an HTTPError holds the response open
    assert e.value.code == 404


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_a_real_prometheus_scrapes_tierd(server: MetricsServer, tmp_path: Path) -> None:
    target = server.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: tierd\n    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    with (tmp_path / "prometheus.log").open("w") as log:
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log)  # the child keeps its own descriptor
    try:
        result = wait_for_series(f"http://127.0.0.1:{port}",
                                 'tierd_moved_pages_total{direction="promote",source_node="1",'
                                 'target_node="0"}',
                                 prometheus)
        assert float(result[0]["value"][1]) == PROMOTED_PAGES
        assert result[0]["metric"]["job"] == "tierd"
        up = query(f"http://127.0.0.1:{port}", 'up{job="tierd"}')
        assert up[0]["value"][1] == "1"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


def wait_for_series(prometheus: str, expr: str, process: subprocess.Popen[bytes]) -> list[dict]:
    """Poll until Prometheus has scraped the series (it scrapes every second)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, "prometheus exited"
        try:
            result = query(prometheus, expr)
        except OSError:
            result = []  # not listening yet
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"prometheus never returned {expr}")


# --- alerting rules and the Grafana dashboard -------------------------------------------

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "packaging" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "packaging" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "packaging" / "grafana" / "tierd-dashboard.json"


def exported_names() -> set[str]:
    """Every sample name tierd exports (families and their _total/_bucket/... samples)."""
    from prometheus_client import generate_latest

    from tierd.service.metrics import build_registry
    names = set()
    for dry_run in (False, True):  # some families only have samples in one mode
        registry = build_registry(populated_state(dry_run), failed_reload, lambda: 5.0)
        names |= {name for name, _ in samples(generate_latest(registry).decode())}
    return names


def tierd_names(expr: str) -> set[str]:
    return set(re.findall(r"\btierd_[a-z_]+", expr))


def alert_rules() -> list[dict]:
    import yaml
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_alert_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = subprocess.run(["promtool", "test", "rules", str(ALERTS_TEST)], capture_output=True,
                            text=True, timeout=120, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_that_fires_it() -> None:
    import yaml
    fired = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
             for case in test["alert_rule_test"] if case.get("exp_alerts")}
    names = {r["alert"] for r in alert_rules()}
    assert names == fired
    assert {"TierdDown", "TierdConfigReloadFailed", "TierdScanLag", "TierdTierFull",
            "TierdMigrationFailureRatio", "TierdMigrationChurn", "TierdNoCollector",
            "TierdHotMemoryOnSlowTier"} <= names


def test_every_alert_stays_silent_on_a_healthy_host() -> None:
    """The healthy case (a well-placed host: fast tier filled to what the policy keeps
    free, trims for lack of room) runs every alert past its `for:` and expects none."""
    import yaml
    tests = {t["name"]: t for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"]}
    healthy = tests["healthy steady state"]
    silent = {case["alertname"] for case in healthy["alert_rule_test"]
              if case["exp_alerts"] == []}
    assert silent == {r["alert"] for r in alert_rules()}
    longest = max(int(r.get("for", "0m").removesuffix("m")) for r in alert_rules())
    assert all(int(case["eval_time"].removesuffix("m")) > longest + 15
               for case in healthy["alert_rule_test"])


def test_alerts_use_only_exported_metrics() -> None:
    exported = exported_names()
    for rule in alert_rules():
        assert tierd_names(rule["expr"]) <= exported, rule["alert"]


def dashboard_panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_dashboard_datasource_is_a_template_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_layout_is_sound() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30


def test_dashboard_units_placement_kernel_context_and_restarts() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in dashboard_panels()}
    assert "pps" not in units.values(), "pps is packets per second"
    page_rates = [p for p in dashboard_panels()
                  if any("_pages_total" in t["expr"] and "rate(" in t["expr"]
                         for t in p["targets"]) and "/" not in p["targets"][0]["expr"]]
    assert page_rates and all(units[p["title"]] == "suffix: pages/s" for p in page_rates)
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard_panels()}
    assert any("tierd_placement_bytes" in e and "heat" in e for e in exprs.values())
    assert any("node_vmstat_pgpromote" in e and "node_vmstat_pgdemote" in e
               for e in exprs.values())
    annotations = [a["expr"] for a in dashboard["annotations"]["list"]]
    assert any("changes(tierd_start_time_seconds" in a for a in annotations)


def test_dashboard_queries_use_exported_metrics_and_parse(tmp_path: Path) -> None:
    exported = exported_names()
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    for expr in exprs:
        assert tierd_names(expr) <= exported, expr
        # node_exporter's instance (its own port) is a variable of its own
        assert 'instance=~"$instance"' in expr or (
            "node_vmstat" in expr and 'instance=~"$node_instance"' in expr), expr
    # promtool parses PromQL when checking rules: one recording rule per query
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}",
         "expr": e.replace("$__rate_interval", "5m").replace("$instance", ".*")
         .replace("$node_instance", ".*")}
        for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))
    result = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the real daemon in the lab guest ----------------------------------------------------


def wait_for(url: str, ready: Callable[[str], bool], process: subprocess.Popen[str]) -> str:
    """GET url until ready(body) (the daemon binds, then finishes its first interval)."""
    deadline = time.monotonic() + 900  # a TCG guest on a busy host: minutes per interval
    body = ""
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            body = get(url)
        except OSError:
            body = ""
        if body and ready(body):
            return body
        time.sleep(0.5)
    process.terminate()
    err = process.communicate(timeout=120)[1]
    raise AssertionError(f"{url} never became ready; last body {body[-1500:]!r};"
                         f" daemon stderr: {err[-3000:]}")


def first_interval_done(text: str) -> bool:
    return value(text, "tierd_intervals_total") >= 1


@pytest.mark.vm(kernels=["tierd"])
def test_tierd_run_in_the_lab_exports_the_real_topology(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "tierd.yaml"
    good = (f"interval: 1\ndry_run: true\nmetrics: {{port: {port}}}\n"
            "collectors: {perf: {enabled: false}, idle: {interval: 1}}\n")
    cfg.write_text(good)
    daemon = subprocess.Popen([sys.executable, "-m", "tierd", "run", "--config", str(cfg)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        text = wait_for(url + "/metrics", first_interval_done, daemon)
        # the lab: node 0 DRAM in memory_tier4, node 1 CXL-like in memory_tier54, 2 GiB each
        total0 = value(text, "tierd_node_memory_total_bytes", node="0", tier="4")
        total1 = value(text, "tierd_node_memory_total_bytes", node="1", tier="54")
        assert 1.5 * GIB < total0 <= 2 * GIB and 1.5 * GIB < total1 <= 2 * GIB
        assert value(text, "tierd_dry_run") == 1
        assert value(text, "tierd_collector_state", collector="idle", state="ok") == 1
        assert promtool_check(text).returncode == 0, promtool_check(text).stdout

        doc = json.loads(get(url + "/status.json"))
        assert [(n["node"], n["tier"]) for n in doc["nodes"]] == [(0, 4), (1, 54)]
        assert doc["nodes"][0]["heat"], "no heat strip for node 0"

        cfg.write_text("interval: fast\n")
        daemon.send_signal(signal.SIGHUP)
        wait_for(url + "/metrics",
                 lambda t: value(t, "tierd_config_last_reload_successful") == 0, daemon)
        cfg.write_text(good)
        daemon.send_signal(signal.SIGHUP)
        wait_for(url + "/metrics",
                 lambda t: value(t, "tierd_config_last_reload_successful") == 1, daemon)
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, err[-3000:]
    assert "Traceback" not in err


def wait_for_healthz(url: str, code: int, process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert process.poll() is None, "tierd exited"
        got, body = healthz(url)
        if got == code:
            return body
        time.sleep(0.5)
    raise AssertionError(f"/healthz never answered {code}")


@pytest.mark.vm(kernels=["tierd"])
def test_healthz_fails_while_the_main_loop_hangs_and_recovers(tmp_path: Path) -> None:
    """A main loop held in one long interval (an idle scan paced to 20,000 PFNs a second
    over the guest's million PFNs) fails /healthz while /metrics, served from another
    thread, still answers; once the interval completes, /healthz recovers."""
    port = free_port()
    cfg = tmp_path / "tierd.yaml"
    cfg.write_text(f"interval: 1\ndry_run: true\nmetrics: {{port: {port}}}\n"
                   "collectors: {perf: {enabled: false},"
                   " idle: {interval: 1, pfns_per_second: 20000}}\n")
    log = (tmp_path / "tierd.log").open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "tierd", "run", "--config", str(cfg)],
                              stdout=log, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url + "/metrics", lambda text: "tierd_intervals_total" in text, daemon)
        body = wait_for_healthz(url, 503, daemon)
        assert body.startswith("stale: "), body
        assert "tierd_intervals_total" in get(url + "/metrics")  # what the old probe read
        wait_for_healthz(url, 200, daemon)
        assert first_interval_done(get(url + "/metrics"))
    finally:
        daemon.terminate()  # the scan checks the stop flag between chunks
        daemon.wait(timeout=300)
        log.close()
    assert daemon.returncode == 0, (tmp_path / "tierd.log").read_text()[-3000:]


def test_every_metric_is_documented() -> None:
    documented = set(re.findall(r"`(tierd_[a-z_]+)`", (REPO / "docs" / "metrics.md").read_text()))
    exported = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exported_names()
                if n.startswith("tierd_")}
    assert exported - documented == set(), "undocumented in docs/metrics.md"
    assert documented - exported == set(), "documented but not exported"
