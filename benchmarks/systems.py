"""The tiering systems tierbench compares, each started and stopped in the guest.

Every system reports the CPU time of its agents: the tasks doing its
tiering work. kswapd and kcompactd count for every system (reclaim is what
demotes under NUMA balancing, and any system's migrations can wake it);
the rest is per system.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from kstat import MM_KTHREADS, CpuTracker, node_pfn_ranges, threads_named
from prometheus_client.parser import text_string_to_metric_families

DAMON = Path("/sys/kernel/mm/damon/admin")
NUMA_BALANCING = Path("/proc/sys/kernel/numa_balancing")
DEMOTION = Path("/sys/kernel/mm/numa/demotion_enabled")
PAGE_SIZE = 4096
FAST_NODE, SLOW_NODE = 0, 1
REPO = Path(__file__).resolve().parent.parent


def write(path: Path, value: object) -> None:
    path.write_text(f"{value}\n")


class System:
    """No tiering: the kernel's default placement, nothing migrates pages."""

    name = "none"

    def __init__(self) -> None:
        self.cpu = CpuTracker()
        self.startup_cpu = 0.0

    def unavailable(self) -> str | None:
        """Why this system cannot run here, or None when it can."""
        return None

    def start(self) -> None:
        write(NUMA_BALANCING, 0)
        if DEMOTION.exists():
            write(DEMOTION, 0)
        self.cpu.start(threads_named(MM_KTHREADS))
        self.launch()
        # A daemon starts once per boot: its start-up CPU is reported apart.
        self.sample()
        self.startup_cpu = self.cpu.seconds()

    def launch(self) -> None:
        """Start the system's own agents (none here)."""

    def sample(self) -> None:
        """Record the agents' CPU time; call once per placement sample."""
        self.cpu.sample(self.agent_pids())

    def agent_pids(self) -> list[int]:
        return threads_named(MM_KTHREADS)

    def agent_cpu_seconds(self) -> float:
        """CPU of the system's agents during the measured phases (after start-up)."""
        return self.cpu.seconds() - self.startup_cpu

    def stop(self) -> None:
        self.sample()

    def report(self) -> dict:
        """What the system said about its run, for the record."""
        return {}


class NumaBalancing(System):
    """Kernel NUMA-balancing tiering (TPP): hinting faults promote, reclaim demotes.

    Its hinting faults and the page-table scans behind them run in the
    workload's own context; the driver charges the workload's system time
    above the no-tiering run's to this system.
    """

    name = "numa_balancing"

    def unavailable(self) -> str | None:
        return None if DEMOTION.exists() else f"{DEMOTION} missing"

    def launch(self) -> None:
        write(DEMOTION, 1)
        write(NUMA_BALANCING, 2)

    def stop(self) -> None:
        self.sample()
        write(NUMA_BALANCING, 0)
        write(DEMOTION, 0)


class DamonTiering(System):
    """DAMOS migrate_hot / migrate_cold on physical addresses, one kdamond per node.

    As damo's scripts/mem_tier.sh and the kernel's samples/damon/mtier.c set
    it up, minus the node-usage quota goals 6.12 lacks: sampling 5 ms,
    aggregation 100 ms; on the slow node migrate_hot to the fast node for
    regions with >= 5% access rate, young pages only; on the fast node
    migrate_cold to the slow node for regions with no access, young pages
    skipped; 200 MiB per second each, applied every second, hottest (or
    coldest) first.
    """

    name = "damon"
    SAMPLE_US, AGGR_US, UPDATE_US = 5_000, 100_000, 1_000_000
    QUOTA_BYTES, QUOTA_RESET_MS, APPLY_US = 200 << 20, 1_000, 1_000_000

    def unavailable(self) -> str | None:
        return None if (DAMON / "kdamonds").exists() else f"{DAMON} missing (no DAMON_SYSFS)"

    def launch(self) -> None:
        ranges = node_pfn_ranges()
        write(DAMON / "kdamonds/nr_kdamonds", 2)
        plans = ((SLOW_NODE, FAST_NODE, "migrate_hot"), (FAST_NODE, SLOW_NODE, "migrate_cold"))
        for index, (source, target, action) in enumerate(plans):
            kdamond = DAMON / f"kdamonds/{index}"
            self._context(kdamond / "contexts", ranges[source])
            self._scheme(kdamond / "contexts/0/schemes", action, target)
        for index in range(len(plans)):
            write(DAMON / f"kdamonds/{index}/state", "on")

    def _context(self, contexts: Path, pfns: tuple[int, int]) -> None:
        write(contexts / "nr_contexts", 1)
        ctx = contexts / "0"
        write(ctx / "operations", "paddr")
        intervals = ctx / "monitoring_attrs/intervals"
        write(intervals / "sample_us", self.SAMPLE_US)
        write(intervals / "aggr_us", self.AGGR_US)
        write(intervals / "update_us", self.UPDATE_US)
        write(ctx / "monitoring_attrs/nr_regions/min", 10)
        write(ctx / "monitoring_attrs/nr_regions/max", 1000)
        write(ctx / "targets/nr_targets", 1)
        write(ctx / "targets/0/regions/nr_regions", 1)
        write(ctx / "targets/0/regions/0/start", pfns[0] * PAGE_SIZE)
        write(ctx / "targets/0/regions/0/end", pfns[1] * PAGE_SIZE)

    def _scheme(self, schemes: Path, action: str, target: int) -> None:
        promote = action == "migrate_hot"
        max_accesses = self.AGGR_US // self.SAMPLE_US
        write(schemes / "nr_schemes", 1)
        scheme = schemes / "0"
        write(scheme / "action", action)
        write(scheme / "target_nid", target)
        write(scheme / "apply_interval_us", self.APPLY_US)
        pattern = scheme / "access_pattern"
        write(pattern / "sz/min", PAGE_SIZE)
        write(pattern / "sz/max", 2**64 - 1)
        write(pattern / "nr_accesses/min", max(1, max_accesses * 5 // 100) if promote else 0)
        write(pattern / "nr_accesses/max", max_accesses if promote else 0)
        write(pattern / "age/min", 0)
        write(pattern / "age/max", 2**32 - 1)
        write(scheme / "quotas/bytes", self.QUOTA_BYTES)
        write(scheme / "quotas/reset_interval_ms", self.QUOTA_RESET_MS)
        write(scheme / "quotas/weights/sz_permil", 0)
        write(scheme / "quotas/weights/nr_accesses_permil", 100)
        write(scheme / "quotas/weights/age_permil", 100)
        # 6.12's filters only exclude: "matching" Y skips young pages (demotion),
        # N skips pages that are not young (promotion: "allow young").
        write(scheme / "filters/nr_filters", 1)
        write(scheme / "filters/0/type", "young")
        write(scheme / "filters/0/matching", "N" if promote else "Y")

    def agent_pids(self) -> list[int]:
        return threads_named((*MM_KTHREADS, "kdamond"))

    def stop(self) -> None:
        self.sample()
        for kdamond in sorted((DAMON / "kdamonds").glob("[0-9]*")):
            if (kdamond / "state").read_text().strip() == "on":
                write(kdamond / "state", "off")
        write(DAMON / "kdamonds/nr_kdamonds", 0)


SHIPPED_CONFIG = REPO / "config" / "tierd.yaml"
# The tuned variant (rows *_tuned): intervals for the benchmark's time scale.
TUNED_CONFIG_TEMPLATE = """\
interval: 3.0
collectors:
  idle:
    interval: 3.0
movers:
  kind: {mover}
  move_all_shared: true
kernel_tiering: coexist
metrics:
  enabled: false
"""


class Tierd(System):
    """tierd's daemon (`tierd run`) with its phys or its PID mover.

    As users get it: the shipped config/tierd.yaml, switched from its dry
    run as the file says, with only `movers.kind` set. `tuned`: the
    labelled variant with the benchmark's intervals.
    """

    def __init__(self, mover: str, config_dir: Path, *, tuned: bool = False) -> None:
        super().__init__()
        self.mover = mover
        self.tuned = tuned
        self.name = f"tierd_{mover}" + "_tuned" * tuned
        self.config = config_dir / f"{self.name}.yaml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.counters: dict[str, dict[str, float]] = {}

    def unavailable(self) -> str | None:
        if self.mover == "phys":
            from tierd.kernel import move_phys

            support = move_phys.probe()
            return None if support.available else str(support)
        return None

    def launch(self) -> None:
        self.config.write_text(self.config_text())
        # A run directory of its own each time: tierd keeps its heat there on stop and
        # takes it back on a start within minutes, which would carry the heat of the
        # last system's run (another mover, another workload) into this one.
        run_dir = self.config.with_suffix(".run")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(mode=0o700)
        with open(self.log_path(), "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierd", "run", "--config", str(self.config)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "RUNTIME_DIRECTORY": str(run_dir)},
            )
        self.wait_started()

    def wait_started(self, timeout: float = 180) -> None:
        """Return once tierd has started (imports, topology, first idle mark).

        A daemon runs before the work it tiers: Python's start-up in the TCG
        guest (15 s or more over 9p) is not placement time, so the phase
        clock starts here. Its CPU still counts (the process's own times).
        """
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while "tierd started" not in self.log_path().read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tierd did not start: {self.log_path().read_text()[-2000:]}")
            time.sleep(0.2)

    def config_text(self) -> str:
        """The shipped config with this mover, or the tuned variant (see
        docs/benchmarks.md): phases of tens of seconds need intervals of seconds."""
        if self.tuned:
            return TUNED_CONFIG_TEMPLATE.format(mover=self.mover)
        config = yaml.safe_load(SHIPPED_CONFIG.read_text())
        config["dry_run"] = False  # the file's documented switch, after a dry run
        config["movers"]["kind"] = self.mover
        return yaml.safe_dump(config, sort_keys=False)

    def log_path(self) -> Path:
        return self.config.with_suffix(".log")

    def agent_pids(self) -> list[int]:
        return threads_named((*MM_KTHREADS, "kdamond"))

    def sample(self) -> None:
        super().sample()
        if self.proc:
            # With its children: tierd may run helpers (compilers for bcc, ...).
            self.cpu.sample([self.proc.pid], children=True)

    def stop(self) -> None:
        self.sample()
        self.counters = self._counters()
        if self.proc:
            self.proc.terminate()
            self.proc.wait(120)

    def _counters(self) -> dict[str, dict[str, float]]:
        """From tierd's metrics ({} without them): its CPU by stage, and the pages it moved
        back the other way within its move history, by direction."""
        metrics = yaml.safe_load(self.config.read_text()).get("metrics") or {}
        if not metrics.get("enabled", True):
            return {}
        url = f"http://{metrics.get('address', '127.0.0.1')}:{metrics.get('port', 9748)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
        return {key: {s.labels[label]: s.value for s in families[name].samples
                      if s.name.endswith("_total")} if name in families else {}
                for key, name, label in (("stage_cpu", "tierd_stage_cpu_seconds", "stage"),
                                         ("pingpong", "tierd_pingpong_pages", "direction"))}

    def report(self) -> dict:
        lines = self.log_path().read_text(errors="replace").splitlines()
        summary = [line for line in lines if line.startswith("tierd: ")]
        return {"tierd_exit_code": self.proc.returncode if self.proc else None,
                "tierd_summary": summary[-1] if summary else None,
                "tierd_log_tail": lines[-5:],
                "tierd_stage_cpu_seconds": self.counters.get("stage_cpu", {}),
                "tierd_pingpong_pages": self.counters.get("pingpong", {})}
