"""Overhead micro-benchmarks: each tierd piece against the raw kernel cost it builds on.

Times in a TCG guest (or on a shared 2-core host) are not absolute, so each
result is a ratio of two measurements taken back to back in the same run:
tierd's path over the raw baseline (a small C program under benchmarks/c,
or the plainest numpy pass over the same data). Every result is a dict
with "status": "ok", or "not available: <why>" and no number.

Host micros (pure CPU work): perf_decode, policy_pass.
Guest micros (need the lab kernel): idle_scan, rmap_build, move_pages,
move_phys, demote_cpu.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import numpy as np

BIN = Path(__file__).resolve().parent.parent / "build" / "bench"
C_SOURCES = Path(__file__).resolve().parent / "c"
HOST_MICROS = ("perf_decode", "policy_pass")
GUEST_MICROS = ("idle_scan", "rmap_build", "move_pages", "move_phys", "demote_cpu")
REPEATS = 3
# A move's wall time in the guest swings 2-5x with host load; an even count runs
# both orders (C first, tierd first) equally often.
MOVE_REPEATS = 6
# Repeats of moves_in_turns: four moves each, cheaper than a round trip per side.
# Under TCG one repeat's ratio swings widely (interquartile range 0.84-1.02 over
# 30 repeats of the PID mover, 2026-12-03), so a median of 10 moved by +-0.05
# from run to run; of 30, by about half that.
TURN_REPEATS = 30
PFNS_1TIB = (1 << 40) // 4096


def build_c(out: Path = BIN) -> Path:
    """Compile the raw baselines (on the host: the guest sees the same path)."""
    out.mkdir(parents=True, exist_ok=True)
    for source in sorted(C_SOURCES.glob("*.c")):
        binary = out / source.stem
        if not binary.exists() or binary.stat().st_mtime < max(
                source.stat().st_mtime, (C_SOURCES / "common.h").stat().st_mtime):
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return out


def run_c(name: str, *args: object) -> dict:
    done = subprocess.run([str(BIN / name), *map(str, args)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(map(str, args))}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def missing(module: str) -> str | None:
    """Why a tierd module cannot be used here, or None."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{module} is not in this checkout yet"


def not_available(why: str, **measured: object) -> dict:
    return {"status": f"not available: {why}", **measured}


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def compared(tierd: list[float], raw: list[float], *, target: float | None = None,
             higher_is_better: bool = False, paired: bool = False, **extra: object) -> dict:
    """Medians of both sides and their ratio; meets_target when a target is given.

    paired: run i of each side was measured back to back, so the ratio is the
    median of the per-run ratios.
    """
    t, r = statistics.median(tierd), statistics.median(raw)
    result: dict = {"status": "ok", "tierd": t, "raw": r, "ratio": t / r if r else None,
                    "tierd_runs": tierd, "raw_runs": raw, **extra}
    if paired and len(tierd) == len(raw) and all(raw):
        # Each repeat measures both sides back to back, so host noise (a TCG guest on
        # a shared host swings 2-5x within seconds) hits both; the median of the
        # per-repeat ratios is the estimate, the ratio of medians mixes repeats.
        result["ratio_of_medians"] = result["ratio"]
        result["ratio"] = statistics.median(a / b for a, b in zip(tierd, raw, strict=True))
    if target is not None and result["ratio"] is not None:
        result["target_ratio"] = target
        ok = result["ratio"] >= target if higher_is_better else result["ratio"] <= target
        result["meets_target"] = bool(ok)
    return result


# --- host micros -----------------------------------------------------------------------


def perf_decode(records: int = 2_000_000) -> dict:
    """tierd's bulk decoder on a synthetic ring vs a bare numpy view of the same bytes.

    Target (issue 4): >= 5 million records per second per core.
    """
    if reason := missing("tierd.kernel.perf_event"):
        return not_available(reason)
    from tierd.kernel import perf_event as pe

    sample_type = (pe.SAMPLE_IP | pe.SAMPLE_TID | pe.SAMPLE_TIME | pe.SAMPLE_ADDR
                   | pe.SAMPLE_CPU | pe.SAMPLE_WEIGHT | pe.SAMPLE_DATA_SRC | pe.SAMPLE_PHYS_ADDR)
    dtype = pe.sample_dtype(sample_type)
    ring = np.zeros(records, dtype=dtype)
    ring["header"]["type"] = pe.RECORD_SAMPLE
    ring["header"]["size"] = dtype.itemsize
    ring["addr"] = np.arange(records, dtype=np.uint64) << np.uint64(12)
    ring["phys_addr"] = ring["addr"]
    data = ring.tobytes()
    mixed = _with_lost_records(ring, every=10_000, header_dtype=pe.HEADER_DTYPE,
                               lost_type=pe.RECORD_LOST)
    decoded = pe.decode(mixed, sample_type)
    assert decoded.samples.size == records and decoded.lost == records // 10_000

    def raw() -> None:
        np.frombuffer(data, dtype=dtype)["addr"].copy()

    def tierd() -> None:
        pe.decode(data, sample_type).samples["addr"].copy()

    def tierd_mixed() -> None:
        pe.decode(mixed, sample_type).samples["addr"].copy()

    raw_s = [timed(raw)[1] for _ in range(REPEATS)]
    tierd_s = [timed(tierd)[1] for _ in range(REPEATS)]
    mixed_s = [timed(tierd_mixed)[1] for _ in range(REPEATS)]
    rate = records / statistics.median(tierd_s)
    mixed_rate = records / statistics.median(mixed_s)
    return compared(tierd_s, raw_s, records=records, record_bytes=dtype.itemsize,
                    records_per_cpu_second=rate, mixed_records_per_cpu_second=mixed_rate,
                    target_records_per_second=5e6, meets_target=bool(min(rate, mixed_rate) >= 5e6),
                    note="seconds are CPU seconds of one decode; mixed = a LOST record "
                         "every 10,000 samples")


def _with_lost_records(ring: np.ndarray, every: int, header_dtype: np.dtype,
                       lost_type: int) -> bytes:
    """The ring's samples with a PERF_RECORD_LOST (id, lost=1) after every `every` samples."""
    lost = np.zeros(1, dtype=[("header", header_dtype), ("id", "<u8"), ("lost", "<u8")])
    lost["header"]["type"] = lost_type
    lost["header"]["size"] = lost.dtype.itemsize
    lost["lost"] = 1
    parts = []
    for start in range(0, ring.size, every):
        parts.append(ring[start:start + every].tobytes())
        if start + every <= ring.size:
            parts.append(lost.tobytes())
    return b"".join(parts)


def policy_pass(npfns: int = PFNS_1TIB) -> dict:
    """One decision pass over a simulated 1 TiB host (268M PFNs) vs one raw pass over its state.

    Simulated: a fast node with a third of the PFNs above a slow node with
    the rest, heat from a skewed random draw, classes computed by the heat
    model. The raw pass is np.bincount over the heat and mark arrays: the
    least any policy must do to look at every PFN once.
    Targets (issue 5): <= 2 s per pass on one core, <= 2 bytes of state per PFN.
    """
    for module in ("tierd.heat", "tierd.policy"):
        if reason := missing(module):
            return not_available(reason)
    from tierd import heat as h
    from tierd import policy

    model = h.HeatModel(npfns)
    rng = np.random.default_rng(1)
    for start in range(0, npfns, h.CHUNK):
        n = min(h.CHUNK, npfns - start)
        # Most pages cold, a tail of warm and hot ones, as on a real host.
        model.heat[start:start + n] = np.minimum(rng.exponential(24, n), 255).astype(np.uint8)
        model.mark[start:start + n] = h._pack(h.WARM, 0, 0)
    for _ in range(3):  # settle streaks past the hysteresis
        model.classify()
    split = npfns // 3
    nodes = [
        policy.NodeTarget(0, 0, ((0, split),), free_pages=split // 100,
                          keep_free_pages=split // 50, demote_to=1),
        policy.NodeTarget(1, 1, ((split, npfns),), free_pages=npfns // 2,
                          keep_free_pages=npfns // 100, promote_to=0),
    ]
    budget = 262_144  # 1 GiB per interval

    def raw() -> None:
        np.bincount(model.heat, minlength=256)
        np.bincount(model.mark, minlength=256)

    def decide() -> None:
        policy.decide(model.heat, model.mark, nodes, budget)

    def interval() -> None:
        model.decay()
        model.classify()

    gc.collect()
    raw_s = [timed(raw)[1] for _ in range(REPEATS)]
    decide_s = [timed(decide)[1] for _ in range(REPEATS)]
    interval_s = [timed(interval)[1] for _ in range(REPEATS)]
    plan = policy.decide(model.heat, model.mark, nodes, budget)
    seconds = statistics.median(decide_s)
    return compared(decide_s, raw_s, npfns=npfns, state_bytes_per_pfn=model.nbytes / npfns,
                    decay_classify_seconds=statistics.median(interval_s),
                    planned_pages=plan.pages(), target_seconds=2.0,
                    meets_target=bool(seconds <= 2.0 and model.nbytes / npfns <= 2),
                    note="CPU seconds; decide() only, decay+classify reported beside it")


# --- guest micros --------------------------------------------------------------------------


def idle_scan() -> dict:
    """tierd's idle scan (mark + collect) vs idle_rw in C over the same PFN ranges.

    Target (issue 4): tierd <= 1.1 x raw per scan, averaged over the collector's
    cycle of one full scan (kpageflags of every block not live, to find new
    user pages, then the live blocks) and full_every - 1 scans of the blocks
    holding user pages. raw sweeps every PFN every time, so those scans may
    cost less than raw; full and steady scans are reported apart.
    Run with a workload resident, so the bitmap write has user pages to walk.
    """
    if not Path("/sys/kernel/mm/page_idle/bitmap").exists():
        return not_available("no /sys/kernel/mm/page_idle/bitmap on this kernel")
    if reason := missing("tierd.collectors.idle"):
        return not_available(reason)
    from tierd.collectors.idle import IdleCollector
    from tierd.collectors.topology import read_topology

    collector = IdleCollector(read_topology())
    ranges = [(r.start, r.end) for r in collector.ranges]

    def raw() -> float:
        return sum(run_c("idle_rw", start, end)["seconds"] for start, end in ranges)

    def scan() -> float:
        return timed(lambda: (collector.mark(), collector.collect()))[0]

    with resident_workload(), pinned():
        raw_s, full_s, steady_s, cycles = [], [], [], []
        for _ in range(REPEATS):
            cycle = []
            for _ in range(collector.full_every):  # raw and tierd in turns: same noise
                raw_s.append(raw())
                full = collector.full_scan
                cycle.append(scan())
                (full_s if full else steady_s).append(cycle[-1])
            cycles.append(statistics.mean(cycle))
        live = collector.live_pfns
    raw_median = statistics.median(raw_s)
    return compared(cycles, raw_s, target=1.1, pfns=collector.tracked_pfns,
                    full_every=collector.full_every,
                    full_ratio=statistics.median(full_s) / raw_median,
                    steady_ratio=statistics.median(steady_s) / raw_median if steady_s else None,
                    steady_pfns=live, full_runs=full_s, steady_runs=steady_s,
                    note="wall seconds per scan (mark + read back), mean over a cycle of "
                         "full_every scans; steady scans cover steady_pfns of pfns")


class resident_workload:
    """The lab workload with 128 MiB hot and 128 MiB cold, running for the block."""

    def __init__(self, hot: str = "128M", cold: str = "128M") -> None:
        self.hot, self.cold = hot, cold

    def __enter__(self) -> object:
        from workload import Workload

        self.workload = Workload.start(self.hot, self.cold)
        return self.workload

    def __exit__(self, *exc: object) -> None:
        self.workload.stop()


class pinned:
    """Run the block (and the C programs it starts) on one CPU, the last one.

    Both sides of a comparison then run on the same CPU, off CPU 0 where the
    guest takes its device interrupts: in a TCG guest that cut the
    run-to-run swings of a move from 2-5x to a few percent.
    """

    def __enter__(self) -> None:
        self.saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {max(self.saved)})

    def __exit__(self, *exc: object) -> None:
        os.sched_setaffinity(0, self.saved)


def rmap_build() -> dict:
    """tierd's reverse-map build vs pagemap_read in C over the same processes, in pages/s.

    Target (issue 5): build rate >= 0.8 x the raw pagemap read; <= 16 bytes
    per tracked page. Both walk /proc for every process (a build must find
    them) and read the same mappings (readable, not the vdso family).
    `raw_given_pids` is the C read of the user processes alone, named in advance.
    Each build starts from an empty map in a warm process, as the daemon's
    full rebuilds do; one unmeasured run of each side comes first.
    """
    if reason := missing("tierd.movers.rmap"):
        return not_available(reason)
    from tierd.collectors.processes import Exclusions, ProcessFilter
    from tierd.movers.rmap import ReverseMap

    with resident_workload("64M", "448M"), pinned():
        pids = user_pids()

        def c_read() -> tuple[dict, float]:
            """The C read of every process, and the rate of the user processes' alone."""
            given = [run_c("pagemap_read", pid) for pid in pids]
            given_rate = sum(r["pages"] for r in given) / sum(r["seconds"] for r in given)
            return run_c("pagemap_read", "all"), given_rate

        def build() -> tuple[ReverseMap, float]:
            rmap = ReverseMap(ProcessFilter(Exclusions(), self_pid=-1))
            return rmap, timed(rmap.refresh)[0]

        # One unmeasured run of each side (first-call costs, /proc's dentries),
        # then turns as in the mover micros: C first, then tierd first.
        c_read()
        build()
        raw_rates, tierd_rates, given_rates = [], [], []
        for repeat in range(MOVE_REPEATS):
            if repeat % 2:
                rmap, seconds = build()
                raw, given_rate = c_read()
            else:
                raw, given_rate = c_read()
                rmap, seconds = build()
            raw_rates.append(raw["pages"] / raw["seconds"])
            tierd_rates.append(raw["pages"] / seconds)
            given_rates.append(given_rate)
    return compared(tierd_rates, raw_rates, target=0.8, higher_is_better=True, paired=True,
                    tracked_pages=rmap.pages, bytes_per_tracked_page=rmap.nbytes / rmap.pages,
                    processes=raw["processes"], user_processes=len(pids),
                    raw_given_pids=statistics.median(given_rates),
                    note="virtual pages read per wall second")


def user_pids() -> list[int]:
    """Processes with a user address space (kernel threads have empty maps)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "maps").read_text():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def write_calls(path: Path, calls: list[np.ndarray]) -> Path:
    """move_loop's BATCH 0 input: each call as a u64 count and its addresses."""
    parts = [np.concatenate(([c.size], c)).astype(np.uint64) for c in calls]
    np.concatenate(parts or [np.zeros(0, np.uint64)]).tofile(path)
    return path


def reached(pid: int, vaddrs: np.ndarray, node: int) -> int:
    """Pages of `vaddrs` now on `node` (a move_pages query): what a move achieved."""
    from tierd.kernel.numa import move_pages

    return int((move_pages(pid, vaddrs) == node).sum())


class Recorder:
    """A move function that records the addresses of each call before making it.

    It keeps the mover's own address array (the movers never write to one
    after building it): a copy would add an array operation to every call,
    which the movers avoid between calls.
    """

    def __init__(self, move: Callable[..., int], address_arg: int) -> None:
        self.move, self.address_arg = move, address_arg
        self.calls: list[np.ndarray] = []

    def __call__(self, *args: object) -> int:
        self.calls.append(args[self.address_arg])
        return self.move(*args)


def moves_in_turns(moves: dict[str, Callable[[int], float]],
                   count: Callable[[int], int]) -> dict[str, list[float]]:
    """Pages per second of each of two sides, tierd and raw, moving one buffer in turns.

    `moves[side](target)` moves the buffer to `target` and returns its
    seconds; `count(target)` says how many pages got there. Per repeat each
    side makes one demotion and one promotion, handing the buffer over to
    the other: tierd to the slow node, raw back, raw to the slow node,
    tierd back (the next repeat raw starts). Under TCG a move's time swings
    1.5-2x between phases lasting a few moves, so a side's two moves lie
    next to the other's rather than a round trip apart.
    """
    rates: dict[str, list[float]] = {"tierd": [], "raw": []}
    for repeat in range(TURN_REPEATS):
        first, second = ("tierd", "raw") if repeat % 2 == 0 else ("raw", "tierd")
        seconds = dict.fromkeys(rates, 0.0)
        pages = dict.fromkeys(rates, 0)
        for side, target in ((first, 1), (second, 0), (second, 1), (first, 0)):
            seconds[side] += moves[side](target)
            pages[side] += count(target)
        for side in rates:
            rates[side].append(pages[side] / seconds[side])
    return rates


def round_trip_rate(move: Callable[[int], float], count: Callable[[int], int]) -> float:
    """Pages per second of one side moving the buffer to the slow node and back."""
    seconds = move(1)
    pages = count(1)
    seconds += move(0)
    return (pages + count(0)) / seconds


def move_pages_micro() -> dict:
    """tierd's PID mover vs move_loop in C replaying its exact move_pages calls, in pages/s.

    Target (issue 5): tierd >= 0.9 x the C loop. The sides move an idle
    64 MiB buffer to the slow node and back in turns (moves_in_turns);
    pages moved are counted by a query after each move. The C loop replays
    the calls tierd last made to the same node (one address per folio, the
    same chunks), so the ratio is tierd's own overhead. `raw_every_page` is
    the C loop over every page's address in chunks of batch_pages, the same
    number of calls: what a mover that does not group pages by folio gets.
    """
    if reason := missing("tierd.movers.pid"):
        return not_available(reason)
    from tierd.collectors.processes import Exclusions, ProcessFilter
    from tierd.kernel import numa
    from tierd.kernel.pagemap import pfns_of
    from tierd.movers.batches import MoverParams
    from tierd.movers.pid import PidMover
    from tierd.movers.rmap import ReverseMap
    from tierd.vocabulary import Batch, Direction

    batch_pages = MoverParams().batch_pages
    with resident_workload("4M", "64M") as workload, pinned():
        pid, vaddrs = workload.pid, workload.region_addresses("cold")
        assert reached(pid, vaddrs, 0) == vaddrs.size, "buffer not on the fast node"
        every_page = Path("/tmp/move-vaddrs.bin")
        vaddrs.astype(np.uint64).tofile(every_page)
        calls = {"tierd": 0, "raw": 0, "raw_every_page": 0}
        replay: dict[int, Path] = {}  # target -> the calls tierd last made to it

        def tierd(target: int) -> float:
            # A fresh map: the C loop's moves are invisible to an incremental refresh.
            rmap = ReverseMap(ProcessFilter(Exclusions(), self_pid=-1))
            rmap.refresh()
            recorder = Recorder(numa.move_pages_into, address_arg=1)
            mover = PidMover(rmap, move_pages=recorder)
            direction = Direction.DEMOTE if target == 1 else Direction.PROMOTE
            batch = Batch(direction, 1 - target, target, np.sort(pfns_of(pid, vaddrs)))
            seconds = timed(lambda: mover.move(batch))[0]
            replay[target] = write_calls(Path(f"/tmp/move-calls-{target}.bin"), recorder.calls)
            calls["tierd"] += len(recorder.calls)
            return seconds

        def c_loop(name: str, target: int, batch_size: int, addr_file: Path) -> float:
            r = run_c("move_loop", "pages", pid, target, batch_size, addr_file)
            calls[name] += r["calls"]
            return r["seconds"]

        def count(target: int) -> int:
            return reached(pid, vaddrs, target)

        tierd(1)  # a warm-up that records the calls the first C replays replay
        tierd(0)
        calls["tierd"] = 0
        rates = moves_in_turns(
            {"tierd": tierd, "raw": lambda target: c_loop("raw", target, 0, replay[target])},
            count)
        every_page_rates = [
            round_trip_rate(lambda t: c_loop("raw_every_page", t, batch_pages, every_page), count)
            for _ in range(REPEATS)]
    return compared(rates["tierd"], rates["raw"], target=0.9, higher_is_better=True, paired=True,
                    pages=int(vaddrs.size), batch_pages=batch_pages, calls=calls,
                    raw_every_page=statistics.median(every_page_rates),
                    raw_every_page_runs=every_page_rates,
                    note="pages moved (by query) per wall second, to the slow node and back")


def phys_support() -> tuple[int | None, str]:
    """(move_phys_pages syscall number, "") when this kernel proves it, else (None, why)."""
    if reason := missing("tierd.kernel.move_phys"):
        return None, reason
    from tierd.kernel import move_phys

    support = move_phys.probe()
    return (support.number, "") if support.available else (None, str(support))


def move_phys_micro() -> dict:
    """tierd's phys mover vs move_loop in C issuing the same move_phys_pages calls, in pages/s.

    Target (issue 5): tierd >= 0.9 x the C loop, same pages, calls and
    directions: the sides move an idle 64 MiB buffer to the slow node and
    back in turns (moves_in_turns); pages moved are counted by a query
    after each move. The C loop's calls are the ones tierd makes, computed
    from the PFNs before each move (one PFN per folio, chunks cut between
    folios); `raw_every_page` is the C loop over every PFN in chunks of
    batch_pages.
    """
    number, why = phys_support()
    if number is None:
        return not_available(why)
    from tierd.kernel.move_phys import move_phys_pages_into
    from tierd.kernel.pagemap import pfns_of
    from tierd.movers import folios
    from tierd.movers.phys import PhysMover
    from tierd.vocabulary import Batch, Direction

    recorder = Recorder(move_phys_pages_into, address_arg=0)
    mover = PhysMover(recorder)
    batch_pages = mover.params.batch_pages

    def phys_calls(pfns: np.ndarray) -> list[np.ndarray]:
        first = folios.read_group_starts(pfns)
        return [pfns[s:e][first[s:e]] << np.uint64(12) for s, e in
                pairwise(folios.chunk_bounds(first, batch_pages))]

    with resident_workload("4M", "64M") as workload, pinned():
        pid, vaddrs = workload.pid, workload.region_addresses("cold")
        addr_file = Path("/tmp/move-phys.bin")
        calls = {"tierd": 0, "raw": 0, "raw_every_page": 0}

        def c_loop(name: str, target: int) -> float:
            pfns = np.sort(pfns_of(pid, vaddrs))
            if name == "raw":
                write_calls(addr_file, phys_calls(pfns))
            else:
                (pfns << np.uint64(12)).tofile(addr_file)
            r = run_c("move_loop", "phys", number, target,
                      0 if name == "raw" else batch_pages, addr_file)
            calls[name] += r["calls"]
            return r["seconds"]

        def tierd(target: int) -> float:
            direction = Direction.DEMOTE if target == 1 else Direction.PROMOTE
            batch = Batch(direction, 1 - target, target, np.sort(pfns_of(pid, vaddrs)))
            recorder.calls.clear()
            seconds = timed(lambda: mover.move(batch))[0]
            calls["tierd"] += len(recorder.calls)
            return seconds

        def count(target: int) -> int:
            return reached(pid, vaddrs, target)

        rates = moves_in_turns({"tierd": tierd, "raw": lambda target: c_loop("raw", target)},
                               count)
        every_page_rates = [round_trip_rate(lambda t: c_loop("raw_every_page", t), count)
                            for _ in range(REPEATS)]
    return compared(rates["tierd"], rates["raw"], target=0.9, higher_is_better=True, paired=True,
                    pages=int(vaddrs.size), batch_pages=batch_pages, calls=calls,
                    raw_every_page=statistics.median(every_page_rates),
                    raw_every_page_runs=every_page_rates, syscall_nr=number,
                    note="pages moved (by query) per wall second, to the slow node and back")


def demote_cpu() -> dict:
    """The RFC's claim: CPU seconds per GiB demoted by physical address vs reverse map + move_pages.

    Both start from the PFNs a collector found (the daemon's view). Phys:
    tierd's phys mover. Reverse map: a reverse-map build of every process,
    then tierd's PID mover. Raw: the same two paths in C (move_loop phys;
    pagemap_read + move_loop pages). CPU time includes the syscalls' kernel
    time; ratio = phys / reverse map (below 1: phys is cheaper).

    The kernel's share swings several times over from one demotion to the
    next (each page's unmap waits for a TLB-flush IPI to the CPU the
    workload last ran on, which under TCG on a busy host may not be running),
    so the four paths take turns, pinned like the mover micros, and each
    path's median is over MOVE_REPEATS demotions. `own_cpu_seconds_per_gib`
    is tierd's own share of each path: its CPU outside the migrating
    syscalls (Python, numpy and its /proc reads), which that swing does not
    reach.
    """
    number, why = phys_support()
    if number is None:
        return not_available(why)
    if reason := missing("tierd.movers.pid"):
        return not_available(reason)
    from tierd.collectors.processes import Exclusions, ProcessFilter
    from tierd.kernel.move_phys import move_phys_pages_into
    from tierd.kernel.numa import move_pages, move_pages_into
    from tierd.kernel.pagemap import pfns_of
    from tierd.movers.phys import PhysMover
    from tierd.movers.pid import PidMover
    from tierd.movers.rmap import ReverseMap
    from tierd.vocabulary import Batch, Direction

    phys_clock = SyscallClock(move_phys_pages_into)
    phys_mover = PhysMover(phys_clock)
    batch_pages = phys_mover.params.batch_pages
    with resident_workload("4M", "64M") as workload, pinned():
        vaddrs = workload.region_addresses("cold")
        gib = vaddrs.size * 4096 / (1 << 30)

        def demotion() -> Batch:
            move_pages(workload.pid, vaddrs, np.zeros(vaddrs.size, np.int32))  # start on fast
            return Batch(Direction.DEMOTE, 0, 1, np.sort(pfns_of(workload.pid, vaddrs)))

        def phys() -> tuple[float, float]:
            batch = demotion()
            return phys_clock.own_and_total_cpu(lambda: phys_mover.move(batch))

        def rmap() -> tuple[float, float]:
            batch = demotion()
            clock = SyscallClock(move_pages_into)

            def build_and_move() -> None:
                reverse = ReverseMap(ProcessFilter(Exclusions(), self_pid=-1))
                reverse.refresh()
                PidMover(reverse, move_pages=clock).move(batch)
            return clock.own_and_total_cpu(build_and_move)

        def raw_phys() -> tuple[float, float]:
            (demotion().pfns << np.uint64(12)).tofile("/tmp/demote-phys.bin")
            return 0.0, run_c("move_loop", "phys", number, 1, batch_pages,
                              "/tmp/demote-phys.bin")["cpu_seconds"]

        def raw_rmap() -> tuple[float, float]:
            demotion()
            vaddrs.astype(np.uint64).tofile("/tmp/demote-vaddrs.bin")
            cpu = sum(run_c("pagemap_read", pid)["cpu_seconds"] for pid in user_pids())
            return 0.0, cpu + run_c("move_loop", "pages", workload.pid, 1, batch_pages,
                                    "/tmp/demote-vaddrs.bin")["cpu_seconds"]

        paths = [("phys", phys), ("rmap", rmap), ("raw_phys", raw_phys), ("raw_rmap", raw_rmap)]
        runs: dict[str, list[float]] = {name: [] for name, _ in paths}
        own: dict[str, list[float]] = {"phys": [], "rmap": []}
        for repeat in range(MOVE_REPEATS):  # turns: each path first once every 4 repeats
            for name, path in paths[repeat % 4:] + paths[:repeat % 4]:
                own_cpu, total = path()
                runs[name].append(total / gib)
                if name in own:
                    own[name].append(own_cpu / gib)
    medians = {name: statistics.median(v) for name, v in runs.items()}
    return {"status": "ok", "tierd": medians["phys"], "raw": medians["rmap"],
            "ratio": medians["phys"] / medians["rmap"],
            "raw_ratio": medians["raw_phys"] / medians["raw_rmap"],
            "cpu_seconds_per_gib": medians, "runs": runs, "gib_per_run": gib,
            "own_cpu_seconds_per_gib": {k: statistics.median(v) for k, v in own.items()},
            "note": "tierd = phys mover, raw = reverse map + PID mover (both tierd, CPU s/GiB); "
                    "raw_ratio = the same two paths in C; paths in turns, medians"}


class SyscallClock:
    """A move function that also sums the CPU time its calls take (the kernel's migration).

    A path's own CPU is its total minus that. getrusage's user/system split
    cannot tell: without VIRT_CPU_ACCOUNTING it comes from tick samples,
    scaled to the runtime and kept monotonic, so in the lab the user time of
    one demotion read 0 in most runs. Thread CPU clocks are exact.
    """

    def __init__(self, move: Callable[..., int]) -> None:
        self.move = move
        self.seconds = 0.0

    def __call__(self, *args: object) -> int:
        start = time.thread_time()
        try:
            return self.move(*args)
        finally:
            self.seconds += time.thread_time() - start

    def own_and_total_cpu(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(CPU seconds outside this clock's calls, all CPU seconds) of one call of fn."""
        self.seconds = 0.0
        total = timed(fn)[1]
        return total - self.seconds, total


def run_host_micro(name: str) -> dict:
    return _run({"perf_decode": perf_decode, "policy_pass": policy_pass}[name])


def run_guest_micro(name: str) -> dict:
    return _run({"idle_scan": idle_scan, "rmap_build": rmap_build,
                 "move_pages": move_pages_micro, "move_phys": move_phys_micro,
                 "demote_cpu": demote_cpu}[name])


def _run(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as e:  # a broken micro must not cost the others
        return {"status": f"failed: {type(e).__name__}: {e}"}
