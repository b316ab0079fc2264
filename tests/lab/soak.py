#!/usr/bin/env python3
"""Soak tierd's own movers: round trips of a buffer between the nodes under concurrent writers.

A victim process maps SIZE bytes (THP on or off) on node 0 and runs writer
threads, each rewriting pages of its own share with a new generation number
(every word of a page holds the page's generation); it also forks children
that share its pages copy-on-write for a moment and exit. Meanwhile this
process moves the victim's pages node 0 -> 1 -> 0 ... through tierd's phys
or PID mover, as the daemon would (a Batch of PFNs read from pagemap). At
the end the victim checks that every word of every page holds its page's
last generation: a byte lost or torn by a move is a failure.

    soak.py --mover pid --thp off --round-trips 1000 --size 256M
    soak.py --all --round-trips 1000    # every mover this kernel has, THP off and on

Prints one JSON line of figures per soak; exits 0 only if no byte changed,
every round completed and the victim was still alive at the end of each.
`make soak` runs --all on both lab kernels (figures: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from workload import parse_size, set_preferred_node

from tierd.collectors.processes import Exclusions, ProcessFilter
from tierd.kernel import move_phys, pagemap
from tierd.movers.batches import MoverParams
from tierd.movers.phys import PhysMover
from tierd.movers.pid import PidMover
from tierd.movers.rmap import ReverseMap
from tierd.vocabulary import Batch, Direction

PAGE = mmap.PAGESIZE
WORDS = PAGE // 8
WRITERS = 2
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def victim(size: int, thp: bool, ready_w: int, stop_r: int) -> int:
    """The process whose pages move; returns its exit status (0: every byte intact)."""
    set_preferred_node(0)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE if thp else mmap.MADV_NOHUGEPAGE)
    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, WORDS)
    gen = np.arange(words.shape[0], dtype=np.uint64) << np.uint64(20)
    words[:] = gen[:, None]
    set_preferred_node(None)
    done = threading.Event()
    writes = [0] * WRITERS
    forks = [0]

    def write(k: int) -> None:
        rng = random.Random(k)
        share = range(k, words.shape[0], WRITERS)
        while not done.is_set():
            p = share[rng.randrange(len(share))]
            gen[p] += np.uint64(1)
            words[p] = gen[p]
            writes[k] += 1

    def fork_and_exit() -> None:
        while not done.wait(0.2):
            child = os.fork()
            if child == 0:
                time.sleep(random.random() / 5)  # shares every page copy-on-write meanwhile
                os._exit(0)
            os.waitpid(child, 0)
            forks[0] += 1

    threads = [threading.Thread(target=write, args=(k,)) for k in range(WRITERS)]
    threads.append(threading.Thread(target=fork_and_exit))
    for t in threads:
        t.start()
    os.write(ready_w, json.dumps({"address": words.ctypes.data}).encode() + b"\n")
    os.read(stop_r, 1)
    done.set()
    for t in threads:
        t.join()
    bad = int(np.count_nonzero((words != gen[:, None]).any(axis=1)))
    print(json.dumps({"pages_changed": bad, "writes": sum(writes), "forks": forks[0]}),
          flush=True)
    return 0 if bad == 0 else 3


def mover(kind: str) -> PidMover | PhysMover:
    params = MoverParams(batch_pages=8192, move_all_shared=False)
    if kind == "phys":
        support = move_phys.probe()
        if not support.usable:
            raise SystemExit(f"soak: no phys mover here: {support.reason}")
        return PhysMover(move_phys.move_phys_pages_into, params)
    return PidMover(ReverseMap(ProcessFilter(Exclusions())), params)


def pfns_of(pid: int, address: int, size: int) -> np.ndarray:
    entries = pagemap.read_ranges(pid, [(address, address + size)])
    pfns = pagemap.pfn_of(entries)
    return np.unique(pfns[pfns != 0])


def soak(kind: str, thp: bool, round_trips: int, size: int) -> dict[str, object]:
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(stop_w)
        os._exit(victim(size, thp, ready_w, stop_r))
    os.close(ready_w)
    os.close(stop_r)
    address = json.loads(os.fdopen(ready_r).readline())["address"]
    chosen = mover(kind)
    moved = failed = 0
    started = time.monotonic()
    try:
        for move in range(2 * round_trips):
            target = 1 - move % 2
            if isinstance(chosen, PidMover):
                chosen.rmap.refresh()
            pfns = pfns_of(pid, address, size)
            direction = Direction.DEMOTE if target == 1 else Direction.PROMOTE
            result = chosen.move(Batch(direction, 1 - target, target, pfns))
            moved += int(result.moved.size)
            failed += int(result.not_moved.size)
    finally:
        seconds = time.monotonic() - started
        alive = os.waitpid(pid, os.WNOHANG) == (0, 0)
        os.write(stop_w, b"x")
        _, status = os.waitpid(pid, 0)
    return {"mover": kind, "thp": thp, "round_trips": round_trips, "size": size,
            "pages_moved": moved, "pages_not_moved": failed, "seconds": round(seconds, 1),
            "victim_alive": alive, "victim_status": os.waitstatus_to_exitcode(status)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mover", choices=["pid", "phys"])
    parser.add_argument("--thp", choices=["on", "off"])
    parser.add_argument("--all", action="store_true",
                        help="every mover this kernel has, THP off and on")
    parser.add_argument("--round-trips", type=int, default=2)
    parser.add_argument("--size", default="256M")
    args = parser.parse_args()
    if args.all:
        movers = ["pid", "phys"] if move_phys.probe().usable else ["pid"]
        runs = [(m, thp) for m in movers for thp in (False, True)]
    elif args.mover and args.thp:
        runs = [(args.mover, args.thp == "on")]
    else:
        parser.error("--mover and --thp, or --all")
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    failed = 0
    for kind, thp in runs:
        figures = _with_thp(thp, lambda k=kind, t=thp: soak(k, t, args.round_trips,
                                                             parse_size(args.size)))
        print(json.dumps(figures), flush=True)
        ok = figures["victim_status"] == 0 and figures["victim_alive"] and \
            figures["pages_moved"]
        failed += not ok
    return 1 if failed else 0


def _with_thp(thp: bool, run: Callable[[], dict[str, object]]) -> dict[str, object]:
    """run() with THP available to madvise when `thp` (the guest may boot with it off)."""
    before = THP_ENABLED.read_text()
    if thp and "[never]" in before:
        THP_ENABLED.write_text("madvise")
    try:
        return run()
    finally:
        if thp and "[never]" in before:
            THP_ENABLED.write_text("never")


if __name__ == "__main__":
    sys.exit(main())
