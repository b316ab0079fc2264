"""Turn the guest's run records into tierbench's results: JSON, a Markdown table, PNG plots.

`summarize` is pure (records in, results out) and unit-tested; `plot` and
`markdown` render a results dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from metrics import PAGE_SIZE, per_gib

SYSTEM_ORDER = ("none", "numa_balancing", "damon", "tierd_phys", "tierd_pid", "tierd_phys_tuned",
                "tierd_pid_tuned", "all_fast")
# The limit row: no tiering, the fast node big enough to hold everything.
LIMIT = "all_fast"
# What each run's record keeps in latest.json besides the headline metrics.
KEPT_FIELDS = ("status", "hot_on_fast_steady", "hot_on_fast_steady_per_phase",
               "seconds_to_90pct", "churn", "pages_had_to_move", "pages_migrated",
               "migration_failures", "agent_cpu_seconds", "agent_startup_cpu_seconds",
               "workload_system_seconds",
               "seconds", "shifts_at", "intact", "vmstat", "tierd_exit_code", "tierd_summary",
               "tierd_log_tail", "tierd_stage_cpu_seconds", "tierd_pingpong_pages",
               "access_share_fast",
               "access_share_fast_lowest", "modeled_memory_time", "accesses",
               "access_series", "throughput", "throughput_unit", "load_seconds")


def summarize(records: list[dict], *, limit: Sequence[dict] = (),
              unjudged: Sequence[dict] = ()) -> dict[str, dict[str, dict]]:
    """results[workload][system]: headline metrics, costs and the placement series.

    NUMA balancing's hinting faults and page-table scans run in the
    workload's own context, so its agent CPU is kswapd/kcompactd plus the
    workload's system time above the same workload's no-tiering run.
    `limit` (the all-fast guest's runs) become each workload's LIMIT row;
    `unjudged` (no-tiering runs without the judge) give the judge's overhead
    on the no-tiering row: throughput without it over throughput with it.
    """
    baseline = {r["workload"]: r.get("workload_system_seconds")
                for r in records if r["system"] == "none" and r["status"] == "ok"}
    results: dict[str, dict[str, dict]] = {}
    for record in records:
        out = {k: record[k] for k in KEPT_FIELDS if k in record}
        if record["status"] == "ok":
            out.update(_costs(record, baseline.get(record["workload"])))
            out["series"] = {"t": [s["t"] for s in record["samples"]],
                             "hot_on_fast": [s["hot_on_fast"] for s in record["samples"]]}
        results.setdefault(record["workload"], {})[record["system"]] = out
    for record in limit:
        if record["workload"] in results:
            results[record["workload"]][LIMIT] = {k: record[k] for k in KEPT_FIELDS
                                                  if k in record}
    for record in unjudged:
        judged = results.get(record["workload"], {}).get("none")
        if judged and record["status"] == "ok":
            judged["judge_overhead"] = judge_overhead(judged, record)
    return results


def judge_overhead(judged: dict, unjudged: dict) -> dict:
    """The application's throughput without the judge over with it (1.0: no cost)."""
    without, with_judge = unjudged.get("throughput"), judged.get("throughput")
    return {"throughput_without": without, "throughput_with": with_judge,
            "slowdown": without / with_judge if without and with_judge else None}


def _costs(record: dict, none_system_seconds: float | None) -> dict:
    agent = record["agent_cpu_seconds"]
    costs: dict = {"agent_cpu_kthreads_and_agents": agent}
    if record["system"] == "numa_balancing":
        if none_system_seconds is None:
            costs["agent_cpu_note"] = "no no-tiering run to subtract: hinting faults not counted"
        else:
            excess = max(0.0, record["workload_system_seconds"] - none_system_seconds)
            costs["agent_cpu_in_workload_context"] = excess
            agent += excess
    costs["agent_cpu_seconds"] = agent
    costs["agent_cpu_per_second"] = agent / record["seconds"] if record["seconds"] else None
    costs["agent_cpu_seconds_per_gib_migrated"] = per_gib(agent, record["pages_migrated"])
    costs["gib_migrated"] = record["pages_migrated"] * PAGE_SIZE / (1 << 30)
    return costs


def _fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return " / ".join(_fmt(v, 0) if v is not None else "never" for v in value)
    return str(value)


def _systems(by_system: dict[str, dict]) -> list[str]:
    known = [s for s in SYSTEM_ORDER if s in by_system]
    return known + sorted(set(by_system) - set(known))


def markdown(results: dict) -> str:
    lines = [
        "| workload | system | hot on fast (steady) | s to 90% per phase | churn "
        "| migrated GiB | failures | agent CPU s | CPU s / GiB | start-up CPU s | intact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, by_system in results["results"].items():
        for system in _systems(by_system):
            r = by_system[system]
            if system == LIMIT or "throughput" in r:
                continue  # no hot set of ours: the access table has these
            if r["status"] != "ok":
                lines.append(f"| {workload} | {system} | {r['status']} ||||||||| |")
                continue
            lines.append(
                f"| {workload} | {system} | {_fmt(r['hot_on_fast_steady'])} "
                f"| {_fmt(r['seconds_to_90pct'])} | {_fmt(r['churn'])} "
                f"| {_fmt(r['gib_migrated'])} | {r['migration_failures']} "
                f"| {_fmt(r['agent_cpu_seconds'])} "
                f"| {_fmt(r['agent_cpu_seconds_per_gib_migrated'])} "
                f"| {_fmt(r.get('agent_startup_cpu_seconds'))} | {_fmt(r['intact'])} |")
    lines += ["", *access_table(results)]
    lines += ["", *stage_table(results)]
    lines += ["", "| micro-benchmark | tierd | raw | ratio | target | meets | status |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in results["micro"].items():
        target = m.get("target_ratio", m.get("target_seconds", m.get("target_records_per_second")))
        lines.append(
            f"| {name} | {_fmt(m.get('tierd'), 4)} | {_fmt(m.get('raw'), 4)} "
            f"| {_fmt(m.get('ratio'))} | {_fmt(target)} | {_fmt(m.get('meets_target'))} "
            f"| {m['status']} |")
    return "\n".join(lines) + "\n"


STAGES = ("collect", "heat", "rmap", "policy", "move")


def stage_table(results: dict) -> list[str]:
    """Where tierd's CPU went: its own split by stage (its metrics), per GiB migrated;
    and the pages it moved back within its move history (ping-pong: up / down)."""
    lines = [
        "| workload | system | CPU s: " + " / ".join(STAGES) + " | rest | per GiB migrated: "
        + " / ".join(STAGES) + " | ping-pong pages: up / down |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for workload, by_system in results["results"].items():
        for system in _systems(by_system):
            r = by_system[system]
            split = r.get("tierd_stage_cpu_seconds")
            if r["status"] != "ok" or not split:
                continue
            cpu = [split.get(stage, 0.0) for stage in STAGES]
            gib = r["gib_migrated"]
            per_gib = " / ".join(_fmt(c / gib, 1) for c in cpu) if gib else "—"
            back = r.get("tierd_pingpong_pages", {})
            lines.append(
                f"| {workload} | {system} | {' / '.join(_fmt(c) for c in cpu)} "
                f"| {_fmt(r['agent_cpu_seconds'] - sum(cpu))} | {per_gib} "
                f"| {back.get('promote', 0):.0f} / {back.get('demote', 0):.0f} |")
    return lines


def access_table(results: dict) -> list[str]:
    """The judge's table: where the workload's accesses were served, per system."""
    lines = [
        "| workload | system | access share fast | lowest over 5 s | modeled memory time "
        "| hot on fast | throughput | judge slowdown |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, by_system in results["results"].items():
        for system in _systems(by_system):
            r = by_system[system]
            if r["status"] != "ok":
                lines.append(f"| {workload} | {system} | {r['status']} ||||||")
                continue
            rate = r.get("throughput")
            throughput = "—" if rate is None else f"{rate:.0f} {r['throughput_unit']}"
            slowdown = r.get("judge_overhead", {}).get("slowdown")
            lines.append(
                f"| {workload} | {system} | {_fmt(r.get('access_share_fast'), 3)} "
                f"| {_fmt(r.get('access_share_fast_lowest'), 3)} "
                f"| {_fmt(r.get('modeled_memory_time'))} | {_fmt(r.get('hot_on_fast_steady'))} "
                f"| {throughput} | {_fmt(slowdown)} |")
    return lines


def plot(results: dict, out: Path) -> list[Path]:
    """One placement-over-time PNG per workload, and one agent-CPU bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [*plot_accesses(results, out)]
    for workload, by_system in results["results"].items():
        if not any(r.get("series", {}).get("t") for r in by_system.values()):
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        shifts: list[float] = []
        for system in _systems(by_system):
            r = by_system[system]
            if r["status"] == "ok" and system != LIMIT:
                ax.plot(r["series"]["t"], r["series"]["hot_on_fast"], label=system)
                shifts = r["shifts_at"]
        for t in shifts:
            ax.axvline(t, color="grey", linestyle=":")
        ax.axhline(0.9, color="grey", linewidth=0.5)
        ax.set(title=f"{workload}: share of the hot set on the fast node",
               xlabel="seconds (dotted: hot set shifts)", ylabel="hot on fast", ylim=(0, 1.02))
        ax.legend(loc="lower right", fontsize="small")
        written.append(_save(fig, out / f"placement-{workload}.png"))
    fig, ax = plt.subplots(figsize=(8, 4))
    workloads = list(results["results"])
    systems = sorted({s for by in results["results"].values() for s in by},
                     key=lambda s: SYSTEM_ORDER.index(s) if s in SYSTEM_ORDER else 99)
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        values = [results["results"][w].get(system, {}).get("agent_cpu_seconds") or 0
                  for w in workloads]
        ax.bar([x + i * width for x in range(len(workloads))], values, width, label=system)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(workloads))], workloads)
    ax.set(title="CPU seconds of the tiering agents per run", ylabel="CPU seconds")
    ax.legend(fontsize="small")
    written.append(_save(fig, out / "agent-cpu.png"))
    return written


def plot_accesses(results: dict, out: Path) -> list[Path]:
    """One access_share_fast-over-time PNG per workload the judge counted."""
    import matplotlib.pyplot as plt

    written = []
    for workload, by_system in results["results"].items():
        if not any(r.get("access_series") for r in by_system.values()):
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        for system in _systems(by_system):
            series = by_system[system].get("access_series")
            if series:
                style = {"color": "black", "linestyle": "--"} if system == LIMIT else {}
                ax.plot(series["t"], series["access_share_fast"], label=system, **style)
        ax.set(title=f"{workload}: share of its memory accesses served by the fast node",
               xlabel="seconds since the tiering system started", ylabel="access share fast",
               ylim=(0, 1.02))
        ax.legend(loc="lower right", fontsize="small")
        written.append(_save(fig, out / f"access-{workload}.png"))
    return written


def _save(fig: object, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
