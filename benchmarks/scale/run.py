"""`make scale`: tierd's memory and CPU on fabricated hosts of 64 GiB to 1 TiB.

For each size: fabricate the host (benchmarks/scale/host.py) under --work,
run tierd's interval loop on it in a child process (measure.py, under
nice), once with the PID mover and its reverse map (up to --pid-max-gib)
and once with a mover that keeps no page map, then delete the host. Writes
benchmarks/results/scale.json and the plot benchmarks/results/scale.png.

Then the lab cross-check (--lab-seconds, 0 for none): a lab guest on the
tierd kernel runs the same loop on its own kernel files, in real time and
moving pages for real with each mover, while a THP workload of 8 processes
swaps its hot and cold sets; its rows carry `"lab": true`. Rows measured
now replace those of the same size, mover and kind in --out; the others stay.

Sampled evidence cannot be measured on fabricated files; its time to cover
all memory is modelled (`modelled_seconds_per_full_round`, see PERF_SAMPLES_PER_S).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE)]

import host as fabricated  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from lab import vm  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# Samples per second the perf collector gets at sample_period 10007 on a busy
# 64-core host (about 3 M sampled events per core-second): an assumption, not
# a measurement (this machine has no memory-access PMU).
PERF_SAMPLES_PER_S = 20_000
DAMON_AGGREGATION_S = 0.1
DAMON_MAX_REGIONS = 1000
# The goals at 1 TiB, drawn on the plot.
GOALS = {"rss_bytes": 2**30, "cpu_fraction_of_core": 0.02, "decide_seconds": 2.0}


def _modelled(shape: fabricated.Shape) -> dict[str, float]:
    """Seconds for sampled evidence to cover all user memory once (each page sampled
    once if accesses were uniform; a lower bound), and DAMON's full pass and its
    resolution."""
    return {
        "perf_uniform_lower_bound": round(shape.user_pages / PERF_SAMPLES_PER_S, 1),
        "damon": DAMON_AGGREGATION_S,
        "damon_region_mib": round(shape.user_pages * 4 / 1024 / DAMON_MAX_REGIONS, 1),
    }


def _measure(root: Path, seconds: float, mover: str) -> dict[str, object]:
    command = ["nice", "-n", "10", sys.executable, str(HERE / "measure.py"), str(root),
               "--seconds", str(seconds), "--mover", mover]
    started = time.monotonic()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    row: dict[str, object] = json.loads(out.splitlines()[-1])
    row["harness_seconds"] = round(time.monotonic() - started, 1)
    return row


# The workload beside the lab cross-check: 8 processes on the slow node at start, THP.
LAB_WORKLOAD = "many --hot 256M --cold 768M --procs 8 --start-node 1"
LAB_NODES = ("768M", "1536M")  # tierbench's lab nodes


def _lab_command(seconds: float) -> str:
    python, state = REPO / ".venv/bin/python", "/tmp/scale-workload.json"
    measure = [f"kill -USR1 $W && {python} {HERE / 'measure.py'} / --lab --mover {mover}"
               f" --seconds {seconds} > /lab-out/{mover}.json || exit 1"
               for mover in ("pid", "phys")]
    return "; ".join([
        f"{python} {REPO / 'benchmarks/workloads.py'} {LAB_WORKLOAD} --state {state} & W=$!",
        f"while [ ! -e {state} ]; do sleep 1; done",  # filled, on the slow node
        *measure, "kill $W; wait $W"])


def _lab_rows(seconds: float) -> list[dict[str, object]]:
    """The cross-check: each mover on the tierd lab kernel (the swap gives each one work)."""
    result = vm.boot(vm.lab_kernel("tierd"), _lab_command(seconds), fast_mem=LAB_NODES[0],
                     slow_mem=LAB_NODES[1], timeout=3600, echo=False)
    if result.rc != 0:
        raise SystemExit(f"scale: the lab guest failed (exit {result.rc}); see {result.outdir}")
    rows = [json.loads((result.outdir / f"{mover}.json").read_text().splitlines()[-1])
            for mover in ("pid", "phys")]
    for row in rows:
        row["workload"] = LAB_WORKLOAD
    return rows


def _key(row: dict[str, object]) -> tuple[object, ...]:
    return row["host_gib"], row["mover"], row.get("lab", False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2, 64, 256, 1024],
                        help="host sizes in GiB (2: beside the lab cross-check)")
    parser.add_argument("--seconds", type=float, default=3600.0,
                        help="virtual seconds of intervals per run, after the first round")
    parser.add_argument("--pid-max-gib", type=int, default=1024,
                        help="largest host run with the PID mover's reverse map")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/tierd-scale"))
    parser.add_argument("--lab-seconds", type=float, default=120.0,
                        help="the lab cross-check's seconds per mover (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for gib in args.sizes:
        root = args.work / f"host-{gib}"
        started = time.monotonic()
        shape = fabricated.fabricate(root, gib)
        made = round(time.monotonic() - started, 1)
        movers = ["pid", "phys"] if gib <= args.pid_max_gib else ["phys"]
        for mover in movers:
            row = _measure(root, args.seconds, mover)
            row["fabricate_seconds"] = made
            row["modelled_seconds_per_full_round"] = _modelled(shape)
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(args, rows)  # each row as it comes: a 1 TiB run is long
        shutil.rmtree(root)
    if args.lab_seconds:
        rows += _lab_rows(args.lab_seconds)
        _write(args, rows)


def _write(args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    """`rows`, dated, over the rows of --out that they do not replace."""
    today = datetime.date.today().isoformat()
    for row in rows:
        row.setdefault("date", today)
    fresh = {_key(r) for r in rows}
    old = json.loads(args.out.read_text()) if args.out.exists() else {"sizes": []}
    kept = [{"date": old.get("date"), **r} for r in old["sizes"]]  # files before per-row dates
    merged = [r for r in kept if _key(r) not in fresh] + rows
    merged.sort(key=lambda r: (bool(r.get("lab")), r["host_gib"], r["mover"]))
    result = {"config": "config/tierd.yaml",
              "machine": "2 cores, 24 GiB, page cache holds the fabricated files",
              "virtual_seconds_per_run": args.seconds, "sizes": merged}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sizes"]
    assert isinstance(rows, list)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = (("rss_bytes", "peak RSS (GiB)", 1 / 2**30),
              ("cpu_fraction_of_core", "CPU (share of one core)", 1.0),
              ("decide_seconds", "longest decision pass (s)", 1.0),
              ("idle_round", "idle round (s)", 1.0))
    for ax, (key, label, scale) in zip(axes.flat, panels, strict=True):
        for mover, style in (("pid", "o-"), ("phys", "s--")):
            lab = [r for r in rows if r["mover"] == mover and r.get("lab")]
            ax.plot([r["host_gib"] for r in lab], [_value(r, key) * scale for r in lab],
                    style[0], fillstyle="none", label=f"{mover} mover, lab guest (TCG)")
            mine = [r for r in rows if r["mover"] == mover and not r.get("lab")]
            ax.plot([r["host_gib"] for r in mine], [_value(r, key) * scale for r in mine], style,
                    label=f"{mover} mover")
            if key == "cpu_fraction_of_core":  # and after the first round, without start-up
                ax.plot([r["host_gib"] for r in mine],
                        [r["steady_cpu_fraction_of_core"] for r in mine], style[0] + ":",
                        label=f"{mover} mover, steady")
        if key in GOALS:
            ax.axhline(GOALS[key] * scale, color="red", linewidth=0.8, label="goal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("host GiB")
        ax.set_title(label)
        ax.legend()
    fig.suptitle("tierd on fabricated hosts (benchmarks/scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _value(row: dict[str, object], key: str) -> float:
    value = row["seconds_per_full_round"]["idle"] if key == "idle_round" else row[key]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
