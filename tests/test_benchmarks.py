"""tierbench's pure parts: metrics, result schema, report rendering (no lab, no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import metrics
import micro
import report
from metrics import PhaseStart, Sample


def ramp(start: float, end: float, rise_at: float, low: float = 0.1) -> list[Sample]:
    """One sample a second: `low` until `rise_at`, then 1.0."""
    return [Sample(float(t), low if t < rise_at else 1.0) for t in range(int(start), int(end))]


def test_seconds_to_share_is_measured_from_each_phase_start() -> None:
    samples = ramp(0, 40, rise_at=12) + ramp(40, 80, rise_at=47)
    assert metrics.seconds_to_share(samples, 0, 40) == 12
    assert metrics.seconds_to_share(samples, 40, 80) == 7


def test_seconds_to_share_is_none_when_never_reached() -> None:
    assert metrics.seconds_to_share(ramp(0, 40, rise_at=99), 0, 40) is None


def test_steady_share_averages_the_last_quarter_only() -> None:
    samples = [Sample(float(t), 0.0 if t < 30 else 0.8) for t in range(40)]
    assert metrics.steady_share(samples, 0, 40) == pytest.approx(0.8)
    assert metrics.steady_share([], 0, 40) is None


def test_pages_that_had_to_move_counts_cold_pages_only_when_room_is_short() -> None:
    roomy = PhaseStart(0, hot_off_fast=100, cold_on_fast=500, fast_free_pages=1000)
    tight = PhaseStart(0, hot_off_fast=100, cold_on_fast=500, fast_free_pages=30)
    assert metrics.pages_that_had_to_move(roomy) == 100
    assert metrics.pages_that_had_to_move(tight) == 100 + 70


def test_churn_is_migrations_per_needed_page() -> None:
    phases = [PhaseStart(0, 100, 0, 1000), PhaseStart(40, 50, 50, 0)]
    assert metrics.churn(300, phases) == pytest.approx(300 / 200)
    assert metrics.churn(10, [PhaseStart(0, 0, 0, 0)]) is None


def test_per_gib_and_ratio_handle_zero() -> None:
    assert metrics.per_gib(2.0, 262144) == pytest.approx(2.0)
    assert metrics.per_gib(2.0, 0) is None
    assert metrics.ratio(3.0, 2.0) == 1.5
    assert metrics.ratio(3.0, 0.0) is None
    assert metrics.ratio(None, 1.0) is None


def test_summarize_quality_splits_at_shifts() -> None:
    samples = ramp(0, 40, rise_at=10) + ramp(40, 80, rise_at=60)
    phases = [PhaseStart(0, 1000, 0, 5000), PhaseStart(40, 800, 0, 5000)]
    q = metrics.summarize_quality(samples, phases, 80, pages_migrated=2700)
    assert q["seconds_to_90pct"] == [10, 20]
    assert q["hot_on_fast_steady"] == pytest.approx(1.0)
    assert q["churn"] == pytest.approx(1.5)


def record(system: str, workload_stime: float, agent: float, migrated: int = 262144) -> dict:
    samples = [{"t": float(t), "hot_on_fast": min(1.0, t / 10)} for t in range(20)]
    return {"workload": "shift", "system": system, "status": "ok", "seconds": 20.0,
            "samples": samples, "shifts_at": [10.0], "hot_on_fast_steady": 1.0,
            "seconds_to_90pct": [9.0, None], "churn": 1.0, "pages_migrated": migrated,
            "migration_failures": 0, "agent_cpu_seconds": agent,
            "workload_system_seconds": workload_stime, "intact": True}


def test_summarize_charges_numa_balancing_its_excess_workload_system_time() -> None:
    results = report.summarize([record("none", 1.0, 0.5, migrated=0),
                                record("numa_balancing", 4.0, 0.5)])
    nb = results["shift"]["numa_balancing"]
    assert nb["agent_cpu_seconds"] == pytest.approx(0.5 + 3.0)
    assert nb["agent_cpu_seconds_per_gib_migrated"] == pytest.approx(3.5)
    assert nb["agent_cpu_per_second"] == pytest.approx(3.5 / 20)
    assert results["shift"]["none"]["agent_cpu_seconds_per_gib_migrated"] is None
    assert nb["series"]["hot_on_fast"][-1] == 1.0


def test_summarize_keeps_unavailable_systems_with_their_reason() -> None:
    results = report.summarize([{"workload": "zipf", "system": "tierd_phys",
                                 "status": "not available: no daemon"}])
    assert results == {"zipf": {"tierd_phys": {"status": "not available: no daemon"}}}


@pytest.fixture
def results() -> dict:
    return {"results": report.summarize([record("none", 1.0, 0.1, migrated=0),
                                         record("damon", 1.0, 2.0),
                                         {"workload": "shift", "system": "tierd_pid",
                                          "status": "not available: no daemon"}]),
            "micro": {"idle_scan": micro.compared([1.2, 1.0, 1.1], [1.0, 1.0, 1.0], target=1.1),
                      "rmap_build": micro.not_available("not yet")}}


def test_markdown_has_a_row_per_run_and_micro(results: dict) -> None:
    table = report.markdown(results)
    assert "| shift | damon | 1.00 | 9 / never |" in table
    assert "| shift | tierd_pid | not available: no daemon |" in table
    assert "| idle_scan | 1.1000 | 1.0000 | 1.10 | 1.10 | yes | ok |" in table
    assert "| rmap_build | — | — | — | — | — | not available: not yet |" in table


def test_the_stage_table_splits_tierds_cpu_per_gib_migrated() -> None:
    tierd = {**record("tierd_phys", 1.0, 5.0), "tierd_stage_cpu_seconds": {
        "collect": 1.0, "heat": 0.5, "policy": 0.25, "move": 2.0},  # 1 GiB migrated
        "tierd_pingpong_pages": {"demote": 12.0}}
    results = {"results": report.summarize([record("damon", 1.0, 2.0), tierd]), "micro": {}}
    table = report.markdown(results)
    assert ("| shift | tierd_phys | 1.00 / 0.50 / 0.00 / 0.25 / 2.00 | 1.25 "
            "| 1.0 / 0.5 / 0.0 / 0.2 / 2.0 | 0 / 12 |") in table
    assert "| shift | damon | 2.00" not in table.split("CPU s: ")[1]  # no split of its own


def test_plots_render_synthetic_results(results: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = report.plot(results, tmp_path)
    assert sorted(p.name for p in written) == ["agent-cpu.png", "placement-shift.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)


def test_compared_ratio_and_target_direction() -> None:
    slower = micro.compared([2.0], [1.0], target=1.1)
    assert slower["ratio"] == 2.0 and slower["meets_target"] is False
    faster = micro.compared([0.95], [1.0], target=0.9, higher_is_better=True)
    assert faster["meets_target"] is True


def test_lost_records_are_interleaved_where_the_decoder_expects_them() -> None:
    pe = pytest.importorskip("tierd.kernel.perf_event")
    dtype = pe.sample_dtype(pe.SAMPLE_ADDR)
    ring = np.zeros(25, dtype=dtype)
    ring["header"]["type"] = pe.RECORD_SAMPLE
    ring["header"]["size"] = dtype.itemsize
    ring["addr"] = np.arange(25)
    data = micro._with_lost_records(ring, every=10, header_dtype=pe.HEADER_DTYPE,
                                    lost_type=pe.RECORD_LOST)
    decoded = pe.decode(data, pe.SAMPLE_ADDR)
    assert decoded.lost == 2
    assert list(decoded.samples["addr"]) == list(range(25))


def test_zipf_cdf_is_skewed_and_normalized() -> None:
    workloads = pytest.importorskip("workloads")
    cdf = workloads.zipf_cdf(1000, 1.0)
    assert cdf[-1] == pytest.approx(1.0)
    assert cdf[99] > 0.6  # the top 10% of pages take most accesses


def test_modeled_memory_time_weighs_each_access_by_its_node_latency() -> None:
    assert metrics.modeled_memory_time([100, 0]) == pytest.approx(1.0)
    assert metrics.modeled_memory_time([0, 100]) == pytest.approx(3.0)
    assert metrics.modeled_memory_time([75, 25]) == pytest.approx((75 * 100 + 25 * 300) / 10000)
    assert metrics.modeled_memory_time([0, 0]) is None


def test_summarize_accesses_counts_the_window_between_first_and_last_sample() -> None:
    samples = [metrics.AccessSample(0.0, (1000, 5000)), metrics.AccessSample(1.0, (1100, 5300)),
               metrics.AccessSample(2.0, (1100, 5300)), metrics.AccessSample(3.0, (1400, 5400))]
    summary = metrics.summarize_accesses(samples)
    assert summary["accesses"] == [400, 400]
    assert summary["access_share_fast"] == pytest.approx(0.5)
    assert summary["modeled_memory_time"] == pytest.approx(2.0)
    # An interval with no new count (the plugin had not published yet) is no sample.
    assert summary["access_series"] == {"t": [1.0, 3.0], "access_share_fast": [0.25, 0.75]}


def app_record(system: str, throughput: float, share: float | None = 0.5) -> dict:
    return {"workload": "redis", "system": system, "status": "ok", "seconds": 30.0,
            "samples": [], "shifts_at": [], "pages_migrated": 0, "migration_failures": 0,
            "agent_cpu_seconds": 0.1, "workload_system_seconds": 1.0, "intact": True,
            "throughput": throughput, "throughput_unit": "GET/s", "access_share_fast": share,
            "modeled_memory_time": 2.0, "accesses": [1, 1],
            "access_series": {"t": [1.0, 2.0], "access_share_fast": [0.4, 0.6]}}


def test_summarize_adds_the_limit_row_and_the_judges_overhead() -> None:
    results = report.summarize([app_record("none", 100.0), app_record("damon", 110.0)],
                               limit=[app_record("none", 120.0, share=1.0)],
                               unjudged=[app_record("none", 700.0, share=None)])
    assert results["redis"][report.LIMIT]["access_share_fast"] == 1.0
    assert results["redis"]["none"]["judge_overhead"]["slowdown"] == pytest.approx(7.0)
    assert "judge_overhead" not in results["redis"]["damon"]
    table = report.markdown({"results": results, "micro": {}})
    assert "| redis | damon | 0.500 | — | 2.00 | — | 110 GET/s | — |" in table
    assert "| redis | all_fast | 1.000 | — | 2.00 | — | 120 GET/s | — |" in table
    assert "| redis | none | 0.500 | — | 2.00 | — | 100 GET/s | 7.00 |" in table


def test_plots_render_the_access_share_per_application(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = report.summarize([app_record("none", 100.0)],
                               limit=[app_record("none", 120.0, share=1.0)])
    written = report.plot({"results": results, "micro": {}}, tmp_path)
    assert sorted(p.name for p in written) == ["access-redis.png", "agent-cpu.png"]


def test_the_lowest_share_is_over_a_window_and_catches_a_dip() -> None:
    """Do no harm: a 2 s dip inside a 5 s window shows; a run shorter than it has none."""
    nodes, samples = [0, 0], []
    for t in range(20):
        on_fast = 20 if 8 <= t < 10 else 90  # a dip at 8-10 s
        nodes = [nodes[0] + on_fast, nodes[1] + 100 - on_fast]
        samples.append(metrics.AccessSample(float(t + 1), (nodes[0], nodes[1])))
    start = [metrics.AccessSample(0.0, (0, 0))]
    assert metrics.lowest_share(start + samples) == pytest.approx((3 * 90 + 2 * 20) / 500)
    assert metrics.lowest_share(start + samples, window=1.0) == pytest.approx(0.2)
    assert metrics.lowest_share(start + samples[:3]) is None


def test_scale_rows_replace_their_own_size_mover_and_kind_and_keep_the_rest(
        tmp_path: Path) -> None:
    import argparse
    import importlib.util
    import json

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scale" / "run.py"
    spec = importlib.util.spec_from_file_location("scale_run", path)
    assert spec and spec.loader
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)

    def row(gib: int, mover: str, rss: int, **extra: object) -> dict[str, object]:
        return {"host_gib": gib, "mover": mover, "rss_bytes": rss, "cpu_fraction_of_core": 0.01,
                "steady_cpu_fraction_of_core": 0.01, "decide_seconds": 0.1,
                "seconds_per_full_round": {"idle": 10.0}, **extra}

    out = tmp_path / "scale.json"
    out.write_text(json.dumps({"date": "2026-01-01", "sizes": [row(64, "pid", 1),
                                                               row(2, "pid", 2)]}))
    args = argparse.Namespace(out=out, seconds=60.0)
    scale._write(args, [row(2, "pid", 3, lab=True), row(64, "pid", 4)])
    sizes = json.loads(out.read_text())["sizes"]
    assert [(r["host_gib"], r.get("lab", False), r["rss_bytes"]) for r in sizes] == [
        (2, False, 2), (64, False, 4), (2, True, 3)]  # the lab row beside, not over, its size
    assert sizes[0]["date"] == "2026-01-01" and sizes[1]["date"] != "2026-01-01"
    assert out.with_suffix(".png").exists()
