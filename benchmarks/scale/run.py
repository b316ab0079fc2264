"""`make scale`: tierd's memory and CPU on fabricated hosts of 64 GiB to 1 TiB.

For each size: fabricate the host (benchmarks/scale/host.py) under --work,
run tierd's interval loop on it in a child process (measure.py, under
nice), once with the PID mover and its reverse map (up to --pid-max-gib)
and once with a mover that keeps no page map, then delete the host. Writes
benchmarks/results/scale.json and the plot benchmarks/results/scale.png.

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024],
                        help="host sizes in GiB")
    parser.add_argument("--seconds", type=float, default=3600.0,
                        help="virtual seconds of intervals per run, after the first round")
    parser.add_argument("--pid-max-gib", type=int, default=1024,
                        help="largest host run with the PID mover's reverse map")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/tierd-scale"))
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    rows = []
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


def _write(args: argparse.Namespace, rows: list[dict[str, object]]) -> None:
    result = {"date": datetime.date.today().isoformat(), "config": "config/tierd.yaml",
              "machine": "2 cores, 24 GiB, page cache holds the fabricated files",
              "virtual_seconds_per_run": args.seconds, "sizes": rows}
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
            mine = [r for r in rows if r["mover"] == mover]
            values = [(r["seconds_per_full_round"]["idle"] if key == "idle_round" else r[key])
                      for r in mine]
            ax.plot([r["host_gib"] for r in mine], [v * scale for v in values], style,
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


if __name__ == "__main__":
    main()
