#!/usr/bin/env python3
"""A hot-set / cold-set workload for the lab, and a handle to drive it from tests.

The process maps two anonymous regions, fills them with a pattern derived
from each word's index, then keeps touching every page of the hot one (read
one word per page, write it back unchanged, then drop the process's TLB
entries as hardware would, tests/lab/tlb.py) and never touches the cold one.
SIGUSR1 swaps which region is hot. SIGTERM stops it; it then checks every
word of both regions against the pattern and exits 0 if all are intact, 3 if
not. Its state (pid, regions, swaps, verdict) is kept in a JSON file.

    workload.py --hot 384M --cold 1792M --start-node 0 --state /tmp/wl.json

`--start-node N` allocates with MPOL_PREFERRED for node N (falling back to
the other node when N is full), cold region first: with H + C larger than
node 0's free memory and N = 0, the cold set fills node 0 and the hot set
spills to the slow node, which is the arrangement a tiering daemon must fix.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE
WORDS_PER_PAGE = PAGE // 8
SYS_SET_MEMPOLICY = 238  # x86_64
MPOL_DEFAULT, MPOL_PREFERRED = 0, 1
PATTERN_SEED = np.uint64(0x9E3779B97F4A7C15)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def set_preferred_node(node: int | None) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    mask = ctypes.c_ulong(0 if node is None else 1 << node)
    mode = MPOL_DEFAULT if node is None else MPOL_PREFERRED
    maskp = None if node is None else ctypes.byref(mask)
    maxnode = 0 if node is None else 64
    if libc.syscall(SYS_SET_MEMPOLICY, mode, maskp, maxnode) != 0:
        raise OSError(ctypes.get_errno(), "set_mempolicy")


def pattern(first_word: int, count: int) -> np.ndarray:
    return (np.arange(first_word, first_word + count, dtype=np.uint64) * PATTERN_SEED) ^ (
        PATTERN_SEED >> np.uint64(7)
    )


class Region:
    """An anonymous mapping filled with the index pattern."""

    CHUNK_WORDS = 1 << 20

    def __init__(self, size: int, offset_words: int) -> None:
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.words = np.frombuffer(self.map, dtype=np.uint64)
        self.offset = offset_words  # so the two regions hold different patterns
        for start in range(0, self.words.size, self.CHUNK_WORDS):
            n = min(self.CHUNK_WORDS, self.words.size - start)
            self.words[start:start + n] = pattern(self.offset + start, n)

    @property
    def address(self) -> int:
        return self.words.ctypes.data

    @property
    def pages(self) -> int:
        return self.words.size // WORDS_PER_PAGE

    def touch(self) -> None:
        """Read and write back one word of every page (sets accessed and dirty)."""
        column = self.words[::WORDS_PER_PAGE]
        column[:] = column.copy()

    def intact(self) -> bool:
        for start in range(0, self.words.size, self.CHUNK_WORDS):
            n = min(self.CHUNK_WORDS, self.words.size - start)
            if not np.array_equal(self.words[start:start + n], pattern(self.offset + start, n)):
                return False
        return True


def run(args: argparse.Namespace) -> int:
    # run() runs only as a script, whose directory (tests/lab) is sys.path[0].
    from tlb import drop_tlb

    state_path = Path(args.state)
    set_preferred_node(args.start_node)
    cold_size, hot_size = parse_size(args.cold), parse_size(args.hot)
    cold = Region(cold_size, 0)
    hot = Region(hot_size, cold_size // 8)
    set_preferred_node(None)
    regions = {"a": hot, "b": cold}  # "a" starts hot
    state = {
        "pid": os.getpid(), "page_size": PAGE,
        "regions": {k: {"address": r.address, "pages": r.pages} for k, r in regions.items()},
        "hot": "a", "swaps": 0, "passes": 0, "intact": None,
    }
    stop = False

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(state_path)

    def on_swap(*_: object) -> None:
        state["hot"] = "b" if state["hot"] == "a" else "a"
        state["swaps"] += 1
        save()

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGUSR1, on_swap)
    signal.signal(signal.SIGTERM, on_term)
    save()
    while not stop:
        regions[state["hot"]].touch()
        drop_tlb()  # as a hardware TLB would: else the next passes set no Accessed bit
        state["passes"] += 1
        time.sleep(args.pause)
    state["intact"] = all(r.intact() for r in regions.values())
    save()
    return 0 if state["intact"] else 3


@dataclass(frozen=True)
class Placement:
    hot_on_fast: float  # share of the hot region's present pages on node 0
    cold_on_slow: float  # share of the cold region's present pages on node 1
    hot_nodes: np.ndarray  # per-page node (or negative errno) of the hot region
    cold_nodes: np.ndarray


class Workload:
    """A running workload.py process, seen from outside (tests, demo, bench)."""

    def __init__(self, proc: subprocess.Popen[bytes], state_path: Path) -> None:
        self.proc = proc
        self.state_path = state_path

    @classmethod
    def start(
        cls, hot: str, cold: str, *, start_node: int | None = 0, state_dir: Path = Path("/tmp"),
        pause: float = 0.05, timeout: float = 600,
    ) -> Workload:
        state_path = state_dir / f"workload-{os.getpid()}-{time.monotonic_ns()}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--hot", hot, "--cold", cold,
               "--state", str(state_path), "--pause", str(pause)]
        if start_node is not None:
            cmd += ["--start-node", str(start_node)]
        proc = subprocess.Popen(cmd)
        deadline = time.monotonic() + timeout
        while not state_path.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"workload exited with {proc.returncode} during setup")
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError("workload setup took too long")
            time.sleep(0.2)
        return cls(proc, state_path)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    def region_addresses(self, which: str) -> np.ndarray:
        """Page addresses of the region now playing `which` ("hot" or "cold")."""
        state = self.state()
        name = state["hot"] if which == "hot" else ("b" if state["hot"] == "a" else "a")
        region = state["regions"][name]
        return region["address"] + PAGE * np.arange(region["pages"], dtype=np.uint64)

    def nodes(self, which: str) -> np.ndarray:
        """Per page of the hot (or cold) region: its node, or a negative errno."""
        from tierd.kernel.numa import move_pages  # the guest has the checkout

        return move_pages(self.pid, self.region_addresses(which))

    def placement(self) -> Placement:
        hot, cold = self.nodes("hot"), self.nodes("cold")
        return Placement(_share(hot, 0), _share(cold, 1), hot, cold)

    def swap(self) -> None:
        swaps = self.state()["swaps"]
        self.proc.send_signal(signal.SIGUSR1)
        while self.state()["swaps"] == swaps:
            time.sleep(0.05)

    def stop(self, timeout: float = 300) -> bool:
        """Stop the workload; True when all its memory still holds the pattern."""
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc == 0 and self.state()["intact"] is True


def _share(status: np.ndarray, node: int) -> float:
    present = status >= 0
    return float((status[present] == node).sum() / max(1, present.sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hot", default="384M")
    parser.add_argument("--cold", default="1792M")
    parser.add_argument("--start-node", type=int, default=None)
    parser.add_argument("--state", required=True, help="JSON state file")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between passes")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
