#!/usr/bin/env python3
"""Workload variants for tierbench, beside the lab's hot/cold workload.

- zipf: one region of H + C pages whose pages are touched with a Zipf-like
  skew (rank r has weight 1 / (r + 1) ** s). The "hot set" is the H
  highest-ranked pages. Ranks start at the region's end (filled last, so on
  the slow node); SIGUSR1 moves the ranking H pages down, onto pages that
  were cold (and, with no tiering, on the slow node too).
- shared: a hot and a cold MAP_SHARED region touched by --procs forked
  processes, so the hot pages are mapped by several processes (what per-PID
  movers find hard: move_pages needs MPOL_MF_MOVE_ALL for them). SIGUSR1
  swaps hot and cold, as in the lab workload.
- many: --procs forked processes, each with its own private hot and cold
  regions (its share of --hot and --cold) backed by transparent huge pages
  (MADV_HUGEPAGE). SIGUSR1 swaps hot and cold in every process at once.

Both fill their memory with the lab workload's checkable pattern, keep their
state in a JSON file like it, and on SIGTERM verify every word (exit 3 when
something changed).

    workloads.py zipf --hot 192M --cold 960M --state /tmp/z.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "lab"))
from tlb import drop_tlb
from workload import (  # the lab workload module, importable from tests/lab
    PAGE,
    WORDS_PER_PAGE,
    Workload,
    parse_size,
    pattern,
    set_preferred_node,
)

CHUNK_WORDS = 1 << 20


def fill(words: np.ndarray, offset: int) -> None:
    for start in range(0, words.size, CHUNK_WORDS):
        n = min(CHUNK_WORDS, words.size - start)
        words[start:start + n] = pattern(offset + start, n)


def intact(words: np.ndarray, offset: int) -> bool:
    for start in range(0, words.size, CHUNK_WORDS):
        n = min(CHUNK_WORDS, words.size - start)
        if not np.array_equal(words[start:start + n], pattern(offset + start, n)):
            return False
    return True


def touch(words: np.ndarray, pages: np.ndarray | None = None) -> None:
    """Read and write back one word of each page (all pages when `pages` is None), then
    drop this process's TLB entries as hardware would (tests/lab/tlb.py): under TCG
    the next touches would otherwise set no Accessed bit, for DAMON, NUMA
    balancing and tierd alike."""
    column = words[::WORDS_PER_PAGE]
    if pages is None:
        column[:] = column.copy()
    else:
        column[pages] = column[pages]
    drop_tlb()


def zipf_cdf(pages: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, pages + 1, dtype=np.float64) ** s
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


class StateFile:
    def __init__(self, path: Path, state: dict) -> None:
        self.path, self.state = path, state

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.path)


def run_zipf(args: argparse.Namespace) -> int:
    hot_pages = parse_size(args.hot) // PAGE
    size = parse_size(args.hot) + parse_size(args.cold)
    set_preferred_node(args.start_node)
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    words = np.frombuffer(region, dtype=np.uint64)
    fill(words, 0)
    set_preferred_node(None)
    pages = size // PAGE
    cdf = zipf_cdf(pages, args.zipf_s)
    state = StateFile(Path(args.state), {
        "pid": os.getpid(), "page_size": PAGE, "kind": "zipf",
        "regions": {"a": {"address": words.ctypes.data, "pages": pages}},
        "hot_pages": hot_pages, "hot_offset": pages - hot_pages, "zipf_s": args.zipf_s,
        "swaps": 0, "intact": None,
    })
    stop = _install_signals(state, lambda s: s.update(
        hot_offset=(s["hot_offset"] - hot_pages) % pages))
    rng = np.random.default_rng(7)
    draws = max(1, hot_pages // 2)
    while not stop():
        ranks = np.searchsorted(cdf, rng.random(draws))
        touch(words, (state.state["hot_offset"] + ranks) % pages)
        time.sleep(args.pause)
    state.state["intact"] = intact(words, 0)
    state.save()
    return 0 if state.state["intact"] else 3


def run_shared(args: argparse.Namespace) -> int:
    set_preferred_node(args.start_node)
    sizes = {"b": parse_size(args.cold), "a": parse_size(args.hot)}  # cold is filled first
    maps = {k: mmap.mmap(-1, n, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
            for k, n in sizes.items()}
    words = {k: np.frombuffer(m, dtype=np.uint64) for k, m in maps.items()}
    offsets = {"b": 0, "a": sizes["b"] // 8}
    for k in ("b", "a"):
        fill(words[k], offsets[k])
    set_preferred_node(None)
    control_map = mmap.mmap(-1, PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    control = np.frombuffer(control_map, dtype=np.int64)  # [hot is "b", stop]
    children = [_fork_toucher(words, control, args.pause) for _ in range(args.procs)]
    state = StateFile(Path(args.state), {
        "pid": os.getpid(), "page_size": PAGE, "kind": "shared", "children": children,
        "regions": {k: {"address": w.ctypes.data, "pages": w.size // WORDS_PER_PAGE}
                    for k, w in words.items()},
        "hot": "a", "swaps": 0, "intact": None,
    })

    _swap_until_stopped(state, control)
    for pid in children:
        os.waitpid(pid, 0)
    state.state["intact"] = all(intact(words[k], offsets[k]) for k in words)
    state.save()
    return 0 if state.state["intact"] else 3


def run_many(args: argparse.Namespace) -> int:
    control_map = mmap.mmap(-1, PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    control = np.frombuffer(control_map, dtype=np.int64)  # [hot is "b", stop]
    sizes = {"b": parse_size(args.cold) // args.procs, "a": parse_size(args.hot) // args.procs}
    owners: dict[str, dict] = {}
    for index in range(args.procs):
        read_end, write_end = os.pipe()
        pid = _fork_owner(index, sizes, args, control, write_end)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            owners[str(pid)] = json.loads(pipe.readline())  # its regions, once filled
    state = StateFile(Path(args.state), {
        "pid": os.getpid(), "page_size": PAGE, "kind": "many",
        "children": [int(pid) for pid in owners], "owners": owners,
        "hot": "a", "swaps": 0, "intact": None,
    })

    _swap_until_stopped(state, control)
    codes = [os.waitstatus_to_exitcode(os.waitpid(int(pid), 0)[1]) for pid in owners]
    state.state["intact"] = all(code == 0 for code in codes)
    state.save()
    return 0 if state.state["intact"] else 3


def _fork_owner(index: int, sizes: dict[str, int], args: argparse.Namespace,
                control: np.ndarray, report: int) -> int:
    """A process with its own THP-backed regions: it reports them on `report`, touches
    the hot one until told to stop, then exits 0 if both are intact, 3 if not."""
    pid = os.fork()
    if pid:
        return pid
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    set_preferred_node(args.start_node)
    words, offsets = {}, {}
    for k in ("b", "a"):  # cold first, as everywhere
        region = mmap.mmap(-1, sizes[k], flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
        words[k] = np.frombuffer(region, dtype=np.uint64)
        offsets[k] = (2 * index + (k == "a")) * sizes["b"] // 8
        fill(words[k], offsets[k])
    set_preferred_node(None)
    regions = {k: {"address": w.ctypes.data, "pages": w.size // WORDS_PER_PAGE}
               for k, w in words.items()}
    os.write(report, (json.dumps(regions) + "\n").encode())
    os.close(report)
    while not control[1]:
        touch(words["b" if control[0] else "a"])
        time.sleep(args.pause)
    os._exit(0 if all(intact(words[k], offsets[k]) for k in words) else 3)


def _fork_toucher(words: dict[str, np.ndarray], control: np.ndarray, pause: float) -> int:
    pid = os.fork()
    if pid:
        return pid
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while not control[1]:
        touch(words["b" if control[0] else "a"])
        time.sleep(pause)
    os._exit(0)


def _swap_until_stopped(state: StateFile, control: np.ndarray) -> None:
    """Swap hot and cold for the touching processes (control[0]) on each SIGUSR1 until
    SIGTERM, then tell them to stop (control[1])."""

    def swap(s: dict) -> None:
        s["hot"] = "b" if s["hot"] == "a" else "a"
        control[0] = s["hot"] == "b"

    stop = _install_signals(state, swap)
    while not stop():
        time.sleep(0.2)
    control[1] = 1


def _install_signals(
    state: StateFile, on_swap: Callable[[dict], None]
) -> Callable[[], bool]:
    """SIGUSR1 applies `on_swap` to the state and saves it; returns a stop() predicate."""
    stopping = False

    def swap(*_: object) -> None:
        on_swap(state.state)
        state.state["swaps"] += 1
        state.save()

    def term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGUSR1, swap)
    signal.signal(signal.SIGTERM, term)
    state.save()
    return lambda: stopping


class Variant(Workload):
    """A running variant: the lab Workload's handle, with its own start and Zipf regions."""

    @classmethod
    def start(cls, kind: str, hot: str, cold: str, *, procs: int = 4, zipf_s: float = 1.0,
              start_node: int = 0, pause: float = 0.05, timeout: float = 600) -> Variant:
        state_path = Path(f"/tmp/variant-{kind}-{os.getpid()}-{time.monotonic_ns()}.json")
        cmd = [sys.executable, __file__, kind, "--hot", hot, "--cold", cold,
               "--state", str(state_path), "--pause", str(pause),
               "--start-node", str(start_node), "--procs", str(procs), "--zipf-s", str(zipf_s)]
        proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + timeout
        while not state_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{kind} workload did not start (exit {proc.returncode})")
            time.sleep(0.2)
        return cls(proc, state_path)

    def pids(self) -> list[int]:
        return [self.pid, *self.state().get("children", [])]

    def nodes(self, which: str) -> np.ndarray:
        """Per page of the hot (or cold) set: its node, or a negative errno."""
        from tierd.kernel.numa import move_pages  # the guest has the checkout

        state = self.state()
        if state["kind"] != "many":
            return super().nodes(which)
        name = state["hot"] if which == "hot" else ("b" if state["hot"] == "a" else "a")
        return np.concatenate([
            move_pages(int(pid), regions[name]["address"]
                       + PAGE * np.arange(regions[name]["pages"], dtype=np.uint64))
            for pid, regions in state["owners"].items()])

    def region_addresses(self, which: str) -> np.ndarray:
        state = self.state()
        if state["kind"] != "zipf":
            return super().region_addresses(which)
        region = state["regions"]["a"]
        ranks = np.arange(state["hot_pages"], dtype=np.uint64)
        hot = (state["hot_offset"] + ranks) % region["pages"]
        pages = hot if which == "hot" else np.setdiff1d(
            np.arange(region["pages"], dtype=np.uint64), hot)
        return region["address"] + PAGE * pages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("zipf", "shared", "many"))
    parser.add_argument("--hot", default="192M")
    parser.add_argument("--cold", default="960M")
    parser.add_argument("--start-node", type=int, default=0)
    parser.add_argument("--state", required=True)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--procs", type=int, default=4,
                        help="shared: touching processes; many: owning processes")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="zipf: skew exponent")
    args = parser.parse_args()
    return {"zipf": run_zipf, "shared": run_shared, "many": run_many}[args.kind](args)


if __name__ == "__main__":
    sys.exit(main())
