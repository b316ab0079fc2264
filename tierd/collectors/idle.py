"""Idle-page collector: per-PFN idle age from /sys/kernel/mm/page_idle/bitmap.

A scan has two passes over the PFN ranges of the chosen nodes: `mark()`
writes all-ones (every PFN idle), then, after the interval, `collect()`
reads the bitmap back together with /proc/kpageflags and updates each PFN's
idle age (evidence.IdleScan: 0 = accessed in the interval, n = idle for n
scans in a row, UNTRACKED = not a user page on the LRU). The ages are the
only per-PFN state: one byte per PFN; everything else is chunk-sized.

The kernel tracks only a large folio's head page, so tail pages take their
head's idle bit (kpageflags' COMPOUND_TAIL marks them; the page before a run
of tails is their head, so one np.repeat per chunk gives every tail its bit).

Only every `full_every`-th scan (and the first) covers every PFN. The others
cover the blocks (BLOCK_PFNS) that held a user LRU page at the last collect:
elsewhere nothing can read back as a tracked page, and reading kpageflags
and unpacking bits there cost as much as the bitmap itself. New user pages
in an empty block are found by the next full scan, which comes early when
many tracked pages left the live blocks (migrated or freed: their pages may
now live anywhere).

Both passes are paced (PFNs per second) so a scan does not hog a core, and
never raise on kernel trouble: a failed read or write leaves the rest of
that range untracked for this scan, logs why and marks `health` degraded.
A range that runs past the bitmap's end by less than a memory block is no
trouble (node spans come from memory blocks and zones; the bitmap ends at
the kernel's last PFN rounded down to a word): the first scan that meets
the end trims the range to it for good, quietly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from tierd.collectors.evidence import IDLE_AGE_MAX, UNTRACKED, IdleScan
from tierd.collectors.topology import PAGE_SIZE, Topology, read_topology
from tierd.errors import KernelFileError, TierdError
from tierd.kernel import kpageflags as kpf
from tierd.kernel import nodes as sysnodes
from tierd.kernel.page_idle import (
    PFNS_PER_WORD,
    IdleBitmap,
    edge_masks,
    unpack,
    words_for,
)
from tierd.kernel.root import HOST, HostRoot
from tierd.probe import Capability, Health, State

log = logging.getLogger(__name__)

# 2^18 PFNs (1 GiB of 4 KiB pages) per chunk: 32 KiB of bitmap, 2 MiB of
# kpageflags; big enough that Python's per-chunk cost vanishes next to the
# kernel's per-page rmap walk.
DEFAULT_CHUNK_PFNS = 1 << 18
ALL_ONES = np.uint64(2**64 - 1)
# Liveness is kept per 2 MiB block (a PMD-size folio never straddles two);
# live blocks at most MERGE_GAP_BLOCKS apart are scanned as one span, since
# each span costs a few syscalls and numpy calls, about what sweeping a few
# blocks of PFNs costs.
BLOCK_PFNS = 512
MERGE_GAP_BLOCKS = 8
DEFAULT_FULL_EVERY = 8
PAST_END = "past the kernel's last PFN"  # no page there: not a reason for a full scan
# A full scan comes early once this share of the tracked pages has vanished
# from the live blocks since the last one.
VANISHED_SHARE = 1 / 16
# Age after one more idle scan, indexed by the current age (UNTRACKED: first scan).
NEXT_AGE = np.minimum(np.arange(256) + 1, IDLE_AGE_MAX).astype(np.uint8)
NEXT_AGE[UNTRACKED] = 1
TRACKED_BITS = kpf.mask(kpf.KPF_LRU, kpf.KPF_NOPAGE)


@dataclass
class NodeIdleStats:
    """Page counts of one node after the last collect()."""

    tracked: int = 0  # user pages on the LRU (a large folio counts all its pages)
    idle: int = 0  # tracked and not accessed during the interval
    anon: int = 0
    anon_idle: int = 0
    huge: int = 0  # tracked pages in large folios (THP)

    @property
    def file(self) -> int:
        return self.tracked - self.anon

    @property
    def file_idle(self) -> int:
        return self.idle - self.anon_idle


class Pacer:
    """Sleeps so that work proceeds at no more than `rate` PFNs per second."""

    def __init__(self, rate: float | None, clock: Callable[[], float],
                 sleep: Callable[[float], None]) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.started = clock()
        self.done = 0

    def advance(self, pfns: int) -> None:
        self.done += pfns
        if not self.rate:
            return
        ahead = self.done / self.rate - (self.clock() - self.started)
        if ahead > 0:
            self.sleep(ahead)


def chunks(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) cut at multiples of `size` (so chunks stay word aligned inside)."""
    while start < end:
        stop = min(end, (start // size + 1) * size)
        yield start, stop
        start = stop


def _blocks(start: int, end: int) -> int:
    """How many BLOCK_PFNS blocks [start, end) touches."""
    return -(-end // BLOCK_PFNS) - start // BLOCK_PFNS


def _slack_pfns(root: HostRoot) -> int:
    """How far a range may run past the bitmap's end: under one memory block.

    Without the block size (no memory hotplug sysfs), the node spans come
    from the zones, which end at the kernel's last PFN: only its partial
    last word is out of the bitmap's reach.
    """
    try:
        size = sysnodes.memory_block_size(root)
    except KernelFileError:
        size = None
    return size // PAGE_SIZE if size else PFNS_PER_WORD


@dataclass
class _Range:
    start: int
    end: int
    node: int
    ages: npt.NDArray[np.uint8]
    live: npt.NDArray[np.bool_]  # per block: held a tracked PFN at the last collect
    spans: list[tuple[int, int]] = field(default_factory=list)  # this scan's, chunk-cut
    marked_until: int = 0  # PFNs from here on were not marked idle in this scan

    @property
    def first_block(self) -> int:
        return self.start // BLOCK_PFNS

    def trim(self, end: int) -> None:
        """Drop the PFNs from `end` on, for good (the per-PFN state and this scan's spans)."""
        self.end = max(self.start, end)
        self.ages = self.ages[:self.end - self.start]
        self.live = self.live[:_blocks(self.start, self.end)]
        self.spans = [(s, min(e, self.end)) for s, e in self.spans if s < self.end]

    def live_spans(self) -> list[tuple[int, int]]:
        """[start, end) PFN runs of live blocks, gaps of under MERGE_GAP_BLOCKS bridged."""
        blocks = np.flatnonzero(self.live)
        if not blocks.size:
            return []
        breaks = np.flatnonzero(np.diff(blocks) > MERGE_GAP_BLOCKS)
        firsts = blocks[np.concatenate(([0], breaks + 1))] + self.first_block
        lasts = blocks[np.concatenate((breaks, [blocks.size - 1]))] + self.first_block
        return [(max(self.start, int(f) * BLOCK_PFNS), min(self.end, (int(t) + 1) * BLOCK_PFNS))
                for f, t in zip(firsts, lasts, strict=True)]


class IdleCollector:
    """Idle ages of the PFNs of `nodes` (default: every node with memory)."""

    def __init__(
        self,
        topology: Topology,
        nodes: list[int] | None = None,
        pfns_per_second: float | None = None,
        root: HostRoot = HOST,
        chunk_pfns: int = DEFAULT_CHUNK_PFNS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        full_every: int = DEFAULT_FULL_EVERY,
    ) -> None:
        if chunk_pfns <= 0 or chunk_pfns % PFNS_PER_WORD:
            raise ValueError(f"chunk_pfns {chunk_pfns} must be a positive multiple of 64")
        if full_every < 1:
            raise ValueError(f"full_every {full_every} must be at least 1")
        wanted = topology.memory_nodes() if nodes is None else nodes
        unknown = sorted(set(wanted) - set(topology.nodes))
        if unknown:
            raise TierdError(f"idle collector: nodes {unknown} are not online")
        self.nodes = sorted(wanted)
        self.pfns_per_second = pfns_per_second
        self.chunk_pfns = chunk_pfns
        self.full_every = full_every
        self._steady_left = 0  # steady scans before the next full one
        self._vanished = 0  # tracked pages gone from live blocks since the last full scan
        self._tracked = 0  # tracked pages at the last collect
        self._scan_is_full = True  # what the last mark() did
        self._lost_track = False  # an error left user pages untracked: next scan is full
        self.clock = clock
        self.sleep = sleep
        self.bitmap = IdleBitmap(root)
        self.flags_file = kpf.kpageflags(root)
        self.ranges = [
            _Range(s, e, n, np.full(e - s, UNTRACKED, dtype=np.uint8),
                   np.zeros(_blocks(s, e), dtype=np.bool_))
            for s, e, n in topology.pfn_ranges(self.nodes)
        ]
        self._slack_pfns = _slack_pfns(root)
        self.stats = {n: NodeIdleStats() for n in self.nodes}
        self.health = Health()
        self._words = np.empty(chunk_pfns // PFNS_PER_WORD + 1, dtype=np.uint64)
        self._flags = np.empty(chunk_pfns, dtype=np.uint64)
        self._problems: list[str] = []

    @property
    def tracked_pfns(self) -> int:
        return sum(r.end - r.start for r in self.ranges)

    @property
    def live_pfns(self) -> int:
        """PFNs a scan between full scans covers now (the live blocks' spans)."""
        return sum(e - s for r in self.ranges for s, e in r.live_spans())

    def _usable(self) -> bool:
        reason = self.bitmap.check()
        if reason is not None:
            self.health = Health(State.UNAVAILABLE, reason)
            return False
        return True

    def _problem(self, message: str) -> None:
        log.warning("idle collector: %s", message)
        self._problems.append(message)

    def _finish(self) -> None:
        self.health = (Health(State.DEGRADED, "; ".join(self._problems))
                       if self._problems else Health())

    # --- pass 1: mark the scan's PFNs idle --------------------------------------------

    @property
    def full_scan(self) -> bool:
        """Whether the next mark() covers every PFN, not only the live blocks."""
        return self._steady_left == 0 or self._vanished > self._tracked * VANISHED_SHARE

    def mark(self) -> None:
        """Mark the scan's PFNs idle (the start of an interval): all, or the live blocks'."""
        if not self._usable():
            return
        self._problems = []
        self._scan_is_full = self.full_scan
        pacer = Pacer(self.pfns_per_second, self.clock, self.sleep)
        for r in self.ranges:
            spans = [(r.start, r.end)] if self._scan_is_full else r.live_spans()
            r.spans = [c for s, e in spans for c in chunks(s, e, self.chunk_pfns)]
            r.marked_until = r.start
            try:
                self._mark_range(r, pacer)
            except KernelFileError as e:
                self._lost_track |= e.reason != PAST_END
                self._problem(f"{e}; node {r.node} partly untracked this scan")
        self._finish()

    def _mark_range(self, r: _Range, pacer: Pacer) -> None:
        for cs, ce in r.spans:
            self._mark_chunk(r, cs, ce)
            pacer.advance(ce - cs)
            if r.marked_until < ce:
                self._past_end(r)
                return

    def _mark_chunk(self, r: _Range, cs: int, ce: int) -> None:
        """Mark [cs, ce) idle; r.marked_until says how far the kernel took it."""
        first, last = words_for(cs, ce)
        words = self._words[:last - first]
        words[:] = ALL_ONES
        head_mask, tail_mask = edge_masks(cs, ce)
        words[0] &= head_mask
        words[-1] &= tail_mask
        written = self.bitmap.write_words(first, words)
        r.marked_until = min(ce, (first + written) * PFNS_PER_WORD)

    def _past_end(self, r: _Range) -> None:
        """The bitmap ended at r.marked_until: trim a slight overrun, raise on more."""
        end = r.marked_until
        if r.end - end >= self._slack_pfns:
            raise KernelFileError(self.bitmap.path, PAST_END, key=f"offset {end // 8:#x}")
        log.debug("idle collector: node %d's range ends %d PFNs past the bitmap; trimmed to %#x",
                  r.node, r.end - end, end)
        r.trim(end)

    # --- pass 2: read back, update ages ---------------------------------------------------

    def collect(self) -> list[IdleScan]:
        """Read back the interval's result; the ages of every range, fast to slow PFN.

        The returned arrays are read-only views of the collector's state,
        valid until the next collect().
        """
        if not self._usable():
            return []
        pacer = Pacer(self.pfns_per_second, self.clock, self.sleep)
        self.stats = {n: NodeIdleStats() for n in self.nodes}
        for r in self.ranges:
            carry: bool | None = None  # idle bit of the last head seen in this span
            done = None  # where the last span ended: a carry only crosses a seamless cut
            cs = r.start
            try:
                for cs, ce in r.spans:
                    carry = self._collect_chunk(r, cs, ce, carry, continues=cs == done)
                    done = ce
                    pacer.advance(ce - cs)
            except KernelFileError as e:
                r.ages[cs - r.start:] = UNTRACKED
                r.live[cs // BLOCK_PFNS - r.first_block:] = False
                self._lost_track = True
                self._problem(f"{e}; node {r.node} partly untracked this scan")
            r.spans = []  # a collect without a mark reads nothing
        self._count_down()
        self._finish()
        now = self.clock()
        scans = []
        for r in self.ranges:
            view = r.ages.view()
            view.flags.writeable = False
            scans.append(IdleScan(r.start, view, now))
        return scans

    def _count_down(self) -> None:
        """After a collect: when the next full scan is due (next, after lost track)."""
        self._tracked = sum(s.tracked for s in self.stats.values())
        if self._scan_is_full:
            self._steady_left, self._vanished = self.full_every - 1, 0
        else:
            self._steady_left -= 1
        if self._lost_track:
            self._steady_left, self._lost_track = 0, False

    def _collect_chunk(self, r: _Range, cs: int, ce: int, carry: bool | None,
                       continues: bool) -> bool | None:
        """Update the ages of [cs, ce); `continues`: the span before ended at cs."""
        n = ce - cs
        first, last = words_for(cs, ce)
        words = self._words[:last - first]
        got = self.bitmap.read_words(first, words)
        idle = unpack(words, cs - first * PFNS_PER_WORD, n)
        flags = self._flags[:n]
        self.flags_file.read_into(cs, flags)
        known_end = min(r.marked_until, (first + got) * PFNS_PER_WORD) - cs
        if got < words.size:
            self._problem(f"{self.bitmap.path}: offset {(first + got) * 8:#x}: "
                          f"bitmap ends inside node {r.node}; the rest is untracked")
        idle, carry = _expand_folios(idle, flags, carry if continues else None)
        tracked = (flags & TRACKED_BITS) == kpf.mask(kpf.KPF_LRU)
        tracked[max(known_end, 0):] = False
        tracked &= idle >= 0  # leading tails whose head lies before the span
        is_idle = tracked & (idle == 1)
        ages = r.ages[cs - r.start:ce - r.start]
        self._vanished += int(np.count_nonzero((ages != UNTRACKED) & ~tracked))
        new_ages = np.take(NEXT_AGE, ages)
        new_ages *= is_idle.view(np.uint8)  # accessed: 0
        new_ages |= (~tracked).view(np.uint8) * np.uint8(UNTRACKED)
        ages[:] = new_ages
        self._note_live(r, cs, tracked, continues)
        self._count(r.node, tracked, is_idle, flags)
        return carry

    @staticmethod
    def _note_live(r: _Range, cs: int, tracked: npt.NDArray[np.bool_], continues: bool) -> None:
        """Record which blocks of [cs, cs + tracked.size) hold a tracked PFN."""
        first = cs // BLOCK_PFNS
        cuts = np.arange(first * BLOCK_PFNS, cs + tracked.size, BLOCK_PFNS) - cs
        cuts[0] = 0
        live = np.logical_or.reduceat(tracked, cuts)
        blocks = r.live[first - r.first_block:first - r.first_block + live.size]
        if continues and cs % BLOCK_PFNS:  # the block's first part was this scan's too
            live[0] |= blocks[0]
        blocks[:] = live

    def _count(self, node: int, tracked: npt.NDArray[np.bool_], is_idle: npt.NDArray[np.bool_],
               flags: npt.NDArray[np.uint64]) -> None:
        anon = tracked & kpf.has_any(flags, kpf.KPF_ANON)
        s = self.stats[node]
        s.tracked += int(np.count_nonzero(tracked))
        s.idle += int(np.count_nonzero(is_idle))
        s.anon += int(np.count_nonzero(anon))
        s.anon_idle += int(np.count_nonzero(anon & is_idle))
        s.huge += int(np.count_nonzero(tracked & kpf.has_any(flags, kpf.KPF_THP)))

    def scan(self, interval: float) -> list[IdleScan]:
        """mark(), wait `interval` seconds, collect()."""
        self.mark()
        self.sleep(interval)
        return self.collect()

    def close(self) -> None:
        self.bitmap.close()
        self.flags_file.close()


def _expand_folios(
    idle: npt.NDArray[np.bool_], flags: npt.NDArray[np.uint64], carry: bool | None,
) -> tuple[npt.NDArray[np.int8], bool | None]:
    """Give every tail page its head's idle bit.

    Returns per PFN 1 (idle), 0 (accessed) or -1 (a tail whose head is
    before the chunk with no carried state), and the carry for the next
    chunk: the idle bit of this chunk's last head.
    """
    expanded = idle.view(np.int8)
    tail = kpf.has_any(flags, kpf.KPF_COMPOUND_TAIL)
    if tail.any():
        expanded = expanded.copy()
        step = np.diff(tail.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(step == 1), np.flatnonzero(step == -1)
        heads = expanded[np.maximum(starts - 1, 0)]
        if starts[0] == 0:  # tails whose head is in the chunk before
            heads[0] = -1 if carry is None else int(carry)
        expanded[tail] = np.repeat(heads, ends - starts)
    if expanded.size:
        carry = bool(expanded[-1]) if expanded[-1] >= 0 else None
    return expanded, carry


def probe(root: HostRoot = HOST) -> list[Capability]:
    """Idle-page tracking needs the bitmap (read-write) and /proc/kpageflags."""
    reason = IdleBitmap(root).check()
    if reason is not None:
        return [Capability("idle_page_tracking", False, reason)]
    try:
        kpf.read_flags(0, 1, root)
    except KernelFileError as e:
        return [Capability("idle_page_tracking", False, str(e))]
    try:
        nodes = read_topology(root).memory_nodes()
    except KernelFileError as e:
        return [Capability("idle_page_tracking", False, f"no topology: {e}")]
    return [Capability("idle_page_tracking", True, f"nodes {nodes}")]
