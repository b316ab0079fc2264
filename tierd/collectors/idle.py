"""Idle-page collector: per-PFN idle age from /sys/kernel/mm/page_idle/bitmap.

A scan has two passes over the live 2 MiB blocks (BLOCK_PFNS) of the chosen
nodes, those that held a user LRU page at the last collect: `mark()` writes
all-ones there (every PFN idle), then, after the interval, `collect()` reads
the bitmap back together with /proc/kpageflags and updates each PFN's idle
age (evidence.IdleScan: 0 = accessed in the interval, n = idle for n scans
in a row, UNTRACKED = not a user page on the LRU). Outside live blocks
nothing can read back as a tracked page, and sweeping them costs as much as
the bitmap itself. The ages are the only per-PFN state: one byte per PFN
(and one per block for liveness); everything else is chunk-sized.

Every `full_every`-th scan (and the first) is full: before marking, it reads
/proc/kpagecount over every block that is not live and makes live those
that now hold a mapped page, so new pages anywhere join that scan (one
mapped outside the live blocks after the look waits for the next full
scan). kpagecount costs half of kpageflags over free memory; what it cannot
see, page cache no process maps, neither mover can move either (no mapping
to move it through), and inside live blocks such pages are tracked anyway.
A full scan comes early when many tracked pages left the live blocks
(migrated or freed: their pages may now live anywhere).

The kernel tracks only a large folio's head page, so tail pages take their
head's idle bit (kpageflags' COMPOUND_TAIL marks them; the page before a run
of tails is their head). LRU folios are at most PMD-size and naturally
aligned, so a folio never straddles two blocks, and the spans of one collect
can be read into one buffer and processed with one set of numpy calls per
chunk, not per span: a numpy call's fixed cost outweighs its loop over a
short span.

Both passes are paced (PFNs per second) so a scan does not hog a core, and
never raise on kernel trouble: a failed read or write leaves the rest of
that range untracked for this scan, logs why and marks `health` degraded.
A range that runs past the bitmap's end by less than a memory block is no
trouble (node spans come from memory blocks and zones; the bitmap ends at
the kernel's last PFN rounded down to a word): the first full scan that
meets the end trims the range to it for good, quietly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import numpy.typing as npt

from tierd.collectors.collector import Setup
from tierd.collectors.evidence import IDLE_AGE_MAX, UNTRACKED, Evidence, IdleScan
from tierd.collectors.topology import Topology, read_topology
from tierd.config import Config
from tierd.errors import KernelFileError, TierdError, Unusable
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
from tierd.vocabulary import PAGE_SIZE, Capability, Health, State

log = logging.getLogger(__name__)

# 2^18 PFNs (1 GiB of 4 KiB pages) per chunk: 32 KiB of bitmap, 2 MiB of
# kpageflags; big enough that Python's per-chunk cost vanishes next to the
# kernel's per-page work.
DEFAULT_CHUNK_PFNS = 1 << 18
ALL_ONES = np.uint64(2**64 - 1)
# Liveness is kept per 2 MiB block (a PMD-size folio never straddles two);
# live blocks at most MERGE_GAP_BLOCKS apart are scanned as one span: a span's
# own syscalls and slice copies cost about as much as sweeping one empty block.
BLOCK_PFNS = 512
MERGE_GAP_BLOCKS = 2
DEFAULT_FULL_EVERY = 8
PAST_END = "past the kernel's last PFN"  # no page there: not a reason for a full scan
# A full scan comes early once this share of the tracked pages has vanished
# from the live blocks since the last one.
VANISHED_SHARE = 1 / 16
# The kpageflags bits a collect needs, as (byte of the little-endian u64, bit in it).
LRU_BIT = (kpf.KPF_LRU // 8, np.uint8(1 << kpf.KPF_LRU % 8))
ANON_BIT = (kpf.KPF_ANON // 8, np.uint8(1 << kpf.KPF_ANON % 8))
TAIL_BIT = (kpf.KPF_COMPOUND_TAIL // 8, np.uint8(1 << kpf.KPF_COMPOUND_TAIL % 8))
THP_BIT = (kpf.KPF_THP // 8, np.uint8(1 << kpf.KPF_THP % 8))
UNKNOWN = -1  # a PFN's idle bit when this scan did not mark it or could not read it


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
                 sleep: Callable[[float], None],
                 checkpoint: Callable[[], None] = lambda: None) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.checkpoint = checkpoint
        self.started = clock()
        self.done = 0

    def advance(self, pfns: int) -> None:
        # Between chunks: a scan of a large host outlasts the watchdog and the stop timeout.
        self.checkpoint()
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


def _block_extent(start: int, end: int) -> tuple[int, int]:
    """[start, end) widened to whole blocks."""
    return start // BLOCK_PFNS * BLOCK_PFNS, -(-end // BLOCK_PFNS) * BLOCK_PFNS


@dataclass
class _Span:
    """A span [start, end) of a batch and its block extent [first, last); PFN p sits at
    layout index p + shift."""

    start: int
    end: int
    first: int
    last: int
    shift: int


@dataclass
class _Batch:
    """Spans of one range laid side by side as whole blocks in the chunk-sized scratch."""

    spans: list[_Span] = field(default_factory=list)
    size: int = 0  # PFNs of the layout

    def add(self, start: int, end: int) -> None:
        first, last = _block_extent(start, end)
        self.spans.append(_Span(start, end, first, last, self.size - first))
        self.size += last - first

    @property
    def pfns(self) -> int:
        return sum(sp.end - sp.start for sp in self.spans)


def _batches(spans: list[tuple[int, int]], size: int) -> Iterator[_Batch]:
    """Consecutive runs of `spans` whose block extents add up to at most `size` PFNs."""
    batch = _Batch()
    for s, e in spans:
        first, last = _block_extent(s, e)
        if batch.spans and batch.size + last - first > size:
            yield batch
            batch = _Batch()
        batch.add(s, e)
    if batch.spans:
        yield batch


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


def _flag(fields: npt.NDArray[np.uint8], bit: tuple[int, np.uint8]) -> npt.NDArray[np.bool_]:
    """Per PFN: is this kpageflags bit set? (`fields`: the flags as n x 8 bytes.)"""
    byte, mask = bit
    return cast(npt.NDArray[np.bool_], (fields[:, byte] & mask) != 0)


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

    def _pfn_runs(self, blocks: npt.NDArray[np.intp], max_step: int) -> list[tuple[int, int]]:
        """[start, end) PFN runs of the given block indexes, at most `max_step` apart in a run."""
        if not blocks.size:
            return []
        breaks = np.flatnonzero(np.diff(blocks) > max_step)
        firsts = blocks[np.concatenate(([0], breaks + 1))] + self.first_block
        lasts = blocks[np.concatenate((breaks, [blocks.size - 1]))] + self.first_block
        return [(max(self.start, int(f) * BLOCK_PFNS), min(self.end, (int(t) + 1) * BLOCK_PFNS))
                for f, t in zip(firsts, lasts, strict=True)]

    def live_spans(self) -> list[tuple[int, int]]:
        """[start, end) PFN runs of live blocks at most MERGE_GAP_BLOCKS apart."""
        return self._pfn_runs(np.flatnonzero(self.live), MERGE_GAP_BLOCKS)

    def dead_spans(self) -> list[tuple[int, int]]:
        """[start, end) PFN runs of blocks that are not live."""
        return self._pfn_runs(np.flatnonzero(~self.live), 1)


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
        checkpoint: Callable[[], None] = lambda: None,
    ) -> None:
        if chunk_pfns <= 0 or chunk_pfns % BLOCK_PFNS:
            raise ValueError(f"chunk_pfns {chunk_pfns} must be a positive multiple of "
                             f"{BLOCK_PFNS}")
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
        self.checkpoint = checkpoint  # called between chunks; raises to abandon the scan
        self.bitmap = IdleBitmap(root)
        self.flags_file = kpf.kpageflags(root)
        self.count_file = kpf.kpagecount(root)
        self.ranges = [
            _Range(s, e, n, np.full(e - s, UNTRACKED, dtype=np.uint8),
                   np.zeros(_blocks(s, e), dtype=np.bool_))
            for s, e, n in topology.pfn_ranges(self.nodes)
        ]
        self._slack_pfns = _slack_pfns(root)
        self.stats = {n: NodeIdleStats() for n in self.nodes}
        self.health = Health()
        # Chunk-sized scratch, reused by every scan.
        self._ones = np.full(chunk_pfns // PFNS_PER_WORD, ALL_ONES, dtype=np.uint64)
        self._words = np.empty(chunk_pfns // PFNS_PER_WORD, dtype=np.uint64)
        self._flags = np.empty(chunk_pfns, dtype=np.uint64)
        self._old_ages = np.empty(chunk_pfns, dtype=np.uint8)
        self._new_ages = np.empty(chunk_pfns, dtype=np.uint8)
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
            self.health = Health(State.DISABLED, reason)
            return False
        return True

    def _problem(self, message: str, where: str = "") -> None:
        """A problem for the log and health; `where` (an offset: a physical position) is
        only logged at debug level, as it says where the host's memory lies."""
        log.warning("idle collector: %s", message)
        if where:
            log.debug("idle collector: %s at %s", message, where)
        self._problems.append(message)

    def _file_problem(self, e: KernelFileError, node: int) -> None:
        self._problem(f"{e.path}: {e.reason}; node {node} partly untracked this scan",
                      e.key or "")

    def _finish(self) -> None:
        self.health = (Health(State.DEGRADED, "; ".join(self._problems))
                       if self._problems else Health())

    # --- pass 1: mark the scan's PFNs idle --------------------------------------------

    @property
    def full_scan(self) -> bool:
        """Whether the next mark() first looks for user pages outside the live blocks."""
        return self._steady_left == 0 or self._vanished > self._tracked * VANISHED_SHARE

    def mark(self) -> None:
        """Mark the live blocks idle (the start of an interval); full scans find new ones first."""
        if not self._usable():
            return
        self._problems = []
        self._scan_is_full = self.full_scan
        pacer = Pacer(self.pfns_per_second, self.clock, self.sleep, self.checkpoint)
        for r in self.ranges:
            if self._scan_is_full:
                self._discover_range(r, pacer)
            r.spans = [c for s, e in r.live_spans() for c in chunks(s, e, self.chunk_pfns)]
            r.marked_until = r.start
            try:
                self._mark_range(r, pacer)
                if self._scan_is_full:
                    self._check_end(r)
            except KernelFileError as e:
                self._lost_track |= e.reason != PAST_END
                self._file_problem(e, r.node)
        self._finish()

    def _discover_range(self, r: _Range, pacer: Pacer) -> None:
        """Make live the blocks outside the live ones that now hold a mapped page."""
        try:
            for s, e in r.dead_spans():
                for cs, ce in chunks(s, e, self.chunk_pfns):
                    self._discover_chunk(r, cs, ce)
                    pacer.advance(ce - cs)
        except KernelFileError as e:
            self._lost_track = True
            self._file_problem(e, r.node)

    def _discover_chunk(self, r: _Range, cs: int, ce: int) -> None:
        bs, be = _block_extent(cs, ce)
        counts = self._flags[:be - bs]
        counts[:cs - bs] = 0  # PFNs of the edge blocks outside the range
        counts[ce - bs:] = 0
        self.count_file.read_into(cs, counts[cs - bs:ce - bs])
        found = np.bitwise_or.reduce(counts.reshape(-1, BLOCK_PFNS), axis=1) != 0  # one pass
        first = bs // BLOCK_PFNS - r.first_block
        r.live[first:first + found.size] |= found

    def _mark_range(self, r: _Range, pacer: Pacer) -> None:
        for cs, ce in r.spans:
            self._mark_chunk(r, cs, ce)
            pacer.advance(ce - cs)
            if r.marked_until < ce:
                self._past_end(r, r.marked_until)
                return

    def _mark_chunk(self, r: _Range, cs: int, ce: int) -> None:
        """Mark [cs, ce) idle; r.marked_until says how far the kernel took it."""
        first, last = words_for(cs, ce)
        words = self._ones[:last - first]
        if cs % PFNS_PER_WORD or ce % PFNS_PER_WORD:  # a range edge: mask its edge words
            words = self._words[:last - first]
            words[:] = ALL_ONES
            head_mask, tail_mask = edge_masks(cs, ce)
            words[0] &= head_mask
            words[-1] &= tail_mask
        written = self.bitmap.write_words(first, words)
        r.marked_until = min(ce, (first + written) * PFNS_PER_WORD)

    def _check_end(self, r: _Range) -> None:
        """Full scans: does the bitmap reach the range's end, where no mark may have gone?"""
        last = (r.end - 1) // PFNS_PER_WORD
        if r.marked_until >= r.end or self._word_readable(last):
            return
        lo, hi = r.marked_until // PFNS_PER_WORD, last  # the first word past the end is in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if self._word_readable(mid):
                lo = mid + 1
            else:
                hi = mid
        self._past_end(r, max(r.start, lo * PFNS_PER_WORD))

    def _word_readable(self, word: int) -> bool:
        return self.bitmap.read_words(word, self._words[:1]) == 1

    def _past_end(self, r: _Range, end: int) -> None:
        """The bitmap ends at PFN `end`: trim a slight overrun, raise on more."""
        if r.end - end >= self._slack_pfns:
            raise KernelFileError(self.bitmap.path, PAST_END, key=f"offset {end // 8:#x}")
        log.debug("idle collector: node %d's range ends %d PFNs past the bitmap; trimmed",
                  r.node, r.end - end)
        r.trim(end)

    # --- pass 2: read back, update ages ---------------------------------------------------

    def collect(self) -> list[IdleScan]:
        """Read back the interval's result; the ages of every range, fast to slow PFN.

        The returned arrays are read-only views of the collector's state,
        valid until the next collect().
        """
        if not self._usable():
            return []
        pacer = Pacer(self.pfns_per_second, self.clock, self.sleep, self.checkpoint)
        self.stats = {n: NodeIdleStats() for n in self.nodes}
        for r in self.ranges:
            cs = r.start
            try:
                for batch in _batches(r.spans, self.chunk_pfns):
                    cs = batch.spans[0].start
                    self._collect_batch(r, batch)
                    pacer.advance(batch.pfns)
            except KernelFileError as e:
                r.ages[cs - r.start:] = UNTRACKED
                r.live[cs // BLOCK_PFNS - r.first_block:] = False
                self._lost_track = True
                self._file_problem(e, r.node)
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

    def _collect_batch(self, r: _Range, batch: _Batch) -> None:
        """Update the ages of the batch's spans from one read of each and one numpy pass."""
        unknown = [u for sp in batch.spans for u in self._gather_span(r, sp)]
        idle = unpack(self._words[:batch.size // PFNS_PER_WORD], 0, batch.size).view(np.int8)
        for a, b in unknown:
            idle[a:b] = UNKNOWN
        fields = self._flags[:batch.size].view(np.uint8).reshape(batch.size, 8)
        tracked, is_idle = self._update_ages(r, batch, fields, idle)
        live = tracked.reshape(-1, BLOCK_PFNS).any(axis=1)
        for sp in batch.spans:
            into = slice(sp.first // BLOCK_PFNS - r.first_block,
                         sp.last // BLOCK_PFNS - r.first_block)
            r.live[into] = live[(sp.first + sp.shift) // BLOCK_PFNS:
                                (sp.last + sp.shift) // BLOCK_PFNS]
        self._count(r.node, tracked, is_idle, fields)

    def _gather_span(self, r: _Range, sp: _Span) -> list[tuple[int, int]]:
        """Bring the span's bitmap words, flags and ages into the layout.

        Returns the layout slices whose idle bit means nothing: the edge
        blocks' PFNs outside the range, and those past the marked PFNs or
        the bitmap's end.
        """
        known_end = max(sp.start, self._read_span(r, sp))
        at = sp.shift
        before, after = (sp.first + at, sp.start + at), (sp.end + at, sp.last + at)
        for a, b in (before, after):
            if a < b:  # an edge block of the range
                self._flags[a:b] = 0
                self._old_ages[a:b] = UNTRACKED
        self._old_ages[sp.start + at:sp.end + at] = r.ages[sp.start - r.start:sp.end - r.start]
        return [u for u in (before, (known_end + at, sp.last + at)) if u[0] < u[1]]

    def _read_span(self, r: _Range, sp: _Span) -> int:
        """Read the span's bitmap words and flags into the layout.

        Returns where the bitmap's evidence ends: the end of the marked PFNs
        or of the bitmap, whichever comes first.
        """
        first, last = words_for(sp.start, sp.end)
        at = sp.shift // PFNS_PER_WORD  # whole blocks: the shift is whole words
        got = self.bitmap.read_words(first, self._words[first + at:last + at])
        bitmap_end = (first + got) * PFNS_PER_WORD
        if bitmap_end < sp.end:
            self._problem(f"{self.bitmap.path}: bitmap ends inside node {r.node}; the rest is"
                          " untracked", f"offset {bitmap_end // 8:#x}")
        self.flags_file.read_into(sp.start, self._flags[sp.start + sp.shift:sp.end + sp.shift])
        return min(r.marked_until, bitmap_end)

    def _update_ages(
        self, r: _Range, batch: _Batch, fields: npt.NDArray[np.uint8],
        idle: npt.NDArray[np.int8],
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """New ages of the batch from its idle bits and flags; returns (tracked, idle) per PFN."""
        idle = _expand_folios(idle, _flag(fields, TAIL_BIT))
        tracked = _flag(fields, LRU_BIT)
        tracked &= idle != UNKNOWN
        is_idle = tracked & (idle == 1)
        old = self._old_ages[:batch.size]
        self._vanished += int(np.count_nonzero((old != UNTRACKED) > tracked))
        new = np.add(old, 1, out=self._new_ages[:batch.size])  # UNTRACKED wraps to 0 ...
        np.minimum(new, IDLE_AGE_MAX, out=new)
        np.maximum(new, 1, out=new)  # ... and starts at 1
        new &= np.negative(is_idle.view(np.uint8))  # accessed: 0
        new |= tracked.view(np.uint8) - np.uint8(1)  # untracked: 0 - 1 = UNTRACKED
        for sp in batch.spans:
            r.ages[sp.start - r.start:sp.end - r.start] = new[sp.start + sp.shift:
                                                              sp.end + sp.shift]
        return tracked, is_idle

    def _count(self, node: int, tracked: npt.NDArray[np.bool_], is_idle: npt.NDArray[np.bool_],
               fields: npt.NDArray[np.uint8]) -> None:
        anon = tracked & _flag(fields, ANON_BIT)
        s = self.stats[node]
        s.tracked += int(np.count_nonzero(tracked))
        s.idle += int(np.count_nonzero(is_idle))
        s.anon += int(np.count_nonzero(anon))
        s.anon_idle += int(np.count_nonzero(anon & is_idle))
        s.huge += int(np.count_nonzero(tracked & _flag(fields, THP_BIT)))

    def scan(self, interval: float) -> list[IdleScan]:
        """mark(), wait `interval` seconds, collect()."""
        self.mark()
        self.sleep(interval)
        return self.collect()

    def close(self) -> None:
        self.bitmap.close()
        self.flags_file.close()
        self.count_file.close()


class IdleFeed:
    """The idle collector in the pipeline: one scan per round, read back when it is due."""

    name = "idle"
    tracks_all_pages = True  # the scan finds every user page on the LRU

    def __init__(self, scanner: IdleCollector, interval: float, scan_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scanner = scanner
        self.scan_interval = scan_interval
        self.clock = clock
        scanner.mark()
        # The first scan reads back after one interval, not a whole scan interval:
        # evidence arrives from the start.
        self._due_at = clock() + min(interval, scan_interval)

    @property
    def health(self) -> Health:
        return self.scanner.health

    def collect(self, interval: float) -> Evidence:
        # Heat ages by idle scan, not by interval: between two scans no round ends.
        # The scan is read back at the interval boundary nearest its due time; a
        # strict ">= due" would skip to the next boundary whenever the scan
        # itself took a moment (a 10 s scan, 5 s interval: every 15 s).
        if self.clock() < self._due_at - interval / 2:
            return Evidence(new_round=False)
        scans = self.scanner.collect()
        self.scanner.mark()
        self._due_at = self.clock() + self.scan_interval
        return Evidence(idle=scans)

    def close(self) -> None:
        self.scanner.close()


def open_collector(config: Config, setup: Setup) -> IdleFeed:
    cfg = config.collectors.idle
    scanner = IdleCollector(setup.topology, list(cfg.nodes) or None, cfg.pfns_per_second,
                            setup.root, sleep=setup.pace.pause,
                            checkpoint=setup.pace.checkpoint)
    feed = IdleFeed(scanner, setup.interval, cfg.interval)
    if scanner.health.state is State.DISABLED:
        scanner.close()
        raise Unusable(scanner.health)
    return feed


def _expand_folios(idle: npt.NDArray[np.int8], tail: npt.NDArray[np.bool_]) -> npt.NDArray[np.int8]:
    """Give every tail page its head's idle bit.

    `idle` is per PFN 1 (idle), 0 (accessed) or UNKNOWN. The head is the
    page before a run of tails; a run at the very start has none in sight
    and becomes UNKNOWN, as does a run whose head was not marked.
    """
    if not tail.any():
        return idle
    not_tail = ~tail
    head_number = np.cumsum(not_tail, dtype=np.int32)  # per PFN: its head's rank, from 1
    heads = np.concatenate(([np.int8(UNKNOWN)], idle[not_tail]))
    return np.take(heads, head_number)  # one gather, no loop over the runs


def probe(root: HostRoot = HOST) -> list[Capability]:
    """Idle-page tracking needs the bitmap (read-write), /proc/kpageflags and /proc/kpagecount."""
    reason = IdleBitmap(root).check()
    if reason is not None:
        return [Capability("idle_page_tracking", False, reason)]
    try:
        for open_file in (kpf.kpageflags, kpf.kpagecount):
            with open_file(root) as f:
                f.read(0, 1)
    except KernelFileError as e:
        return [Capability("idle_page_tracking", False, str(e))]
    try:
        nodes = read_topology(root).memory_nodes()
    except KernelFileError as e:
        return [Capability("idle_page_tracking", False, f"no topology: {e}")]
    return [Capability("idle_page_tracking", True, f"nodes {nodes}")]
