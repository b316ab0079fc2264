"""Per-PFN heat: the collectors' evidence folded into two bytes per PFN.

`heat` (uint8) is a decayed access count in fixed point (HEAT_SCALE units per
access). Heat ages in *rounds*: one round is one complete round of evidence
(an idle-bitmap scan where the idle collector runs, else one interval). At
the start of each round every heat value is multiplied by `decay`; every
interval's evidence is added as it comes:

- an idle-bitmap scan that saw the page accessed adds `idle_access_weight`;
- each perf sample of the page adds `sample_weight`;
- a DAMON region adds `region_weight` x its access rate (nr_accesses / max)
  relative to `region_hot_rate`, capped at 1: DAMON checks one page per
  region per sampling interval, so a page touched every few hundred ms shows
  a rate of a few percent (damo's tiering setup calls 5% hot).

`mark` (uint8) holds what the policy needs besides heat, per PFN:

    bits 0-2  streak: consecutive rounds in the current class (saturates at 7)
    bits 3-4  class: 0 untracked, 1 cold, 2 warm, 3 hot
    bits 5-7  cooldown: rounds before the page may be moved again

Classes are recomputed every interval, but streaks and cooldowns count
rounds: with a 30 s idle scan and a 5 s interval, a page's idle evidence
must not decay away (or its hysteresis be satisfied) between two scans.

"Untracked" PFNs (kernel memory, free frames, huge-page tails) are never
candidates. A "pinned" PFN (the mark value PINNED: class 0 with all other bits
set) is an untracked PFN the movers found unmovable (mlocked, unevictable,
an excluded process's): it stays out of the candidates until unpin_all().
A PFN becomes tracked when an idle scan says it is a user LRU page, when it
is sampled, or when the reverse map finds it mapped; it starts with
`initial_heat` (none: its first round's evidence classifies it) and a cooldown
of NEW_PAGE_COOLDOWN rounds, so its first round of evidence alone never
moves it. The pages the model's first round finds are the exception: they
were there before tierd started, new only to tierd, so that round's
evidence counts as any later round's would. After that, one round in the
hot class moves a page into free room (tierd.policy); a move that displaces
another page waits for the hysteresis. A page the movers moved away leaves an
untracked frame behind; where its new PFN is known (PID mover) the heat and
a fresh cooldown follow it.

Everything here is whole-array numpy, processed in chunks so that a 268M-PFN
host needs no temporaries beyond a few chunk-sized arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from tierd.collectors.evidence import UNTRACKED, IdleScan, RegionBatch, SampleBatch

HEAT_SCALE = 16  # heat units per access: uint8 covers 0 .. 15.94 accesses
HEAT_MAX = 255

STREAK_MASK = np.uint8(0b0000_0111)
CLASS_SHIFT = 3
CLASS_MASK = np.uint8(0b0001_1000)
COOLDOWN_SHIFT = 5
COOLDOWN_MASK = np.uint8(0b1110_0000)
STREAK_MAX = 7
COOLDOWN_MAX = 7



class HeatClass(IntEnum):
    """A PFN's class, bits 3-4 of its mark byte."""

    UNTRACKED = 0
    COLD = 1
    WARM = 2
    HOT = 3


UNTRACKED_CLASS, COLD, WARM, HOT = HeatClass
PINNED = np.uint8(0b1110_0111)

CHUNK = 1 << 24  # PFNs per vectorized step
# PFNs per step of an idle scan's fold: its index temporaries cost 8 bytes a PFN.
IDLE_CHUNK = 1 << 20
# PFNs per step of decay() and classify(): the table lookup's indices (8 bytes a PFN)
# and classify's eight byte-per-PFN temporaries stay at 32 MiB.
PASS_CHUNK = 1 << 22
# Evidence regions up to this many PFNs are added by fancy indexing, longer ones by slices.
SHORT_REGION_PFNS = 64
# Rounds a newly tracked page sits out: its first round of evidence alone never moves
# it, and a frame a mover could not move (vacated, then found again) is not picked
# again at once.
NEW_PAGE_COOLDOWN = 2


@dataclass(frozen=True)
class HeatParams:
    """How evidence turns into heat and heat into classes (heat in accesses, not units)."""

    decay: float = 0.5  # share of heat kept from one round to the next
    hot_threshold: float = 4.0  # heat >= this: hot
    cold_threshold: float = 0.5  # heat <= this: cold
    idle_access_weight: float = 4.0  # one observed access in an idle scan
    sample_weight: float = 1.0  # per perf sample
    region_weight: float = 4.0  # a DAMON region at or above region_hot_rate
    region_hot_rate: float = 0.02  # DAMON access rate (nr_accesses / max) that counts fully
    initial_heat: float = 0.0  # a newly tracked page, before its first evidence
    cooldown_rounds: int = 2  # rounds after a move (or a failed attempt)

    def units(self, accesses: float) -> int:
        return int(min(HEAT_MAX, round(accesses * HEAT_SCALE)))

    @property
    def hot_units(self) -> int:
        return self.units(self.hot_threshold)

    @property
    def cold_units(self) -> int:
        return self.units(self.cold_threshold)

    @property
    def settle_units(self) -> int:
        """Twice the hot threshold: two rounds' worth of hot evidence in one. Above
        HEAT_MAX when the scale cannot hold it, and then no heat settles a page."""
        return round(2 * self.hot_threshold * HEAT_SCALE)


def _pack(cls: int, streak: int, cooldown: int) -> np.uint8:
    return np.uint8((cooldown << COOLDOWN_SHIFT) | (cls << CLASS_SHIFT) | streak)


def classes(mark: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return (mark & CLASS_MASK) >> np.uint8(CLASS_SHIFT)


def streaks(mark: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return mark & STREAK_MASK


def cooldowns(mark: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    return mark >> np.uint8(COOLDOWN_SHIFT)


class HeatModel:
    """Heat and marks of PFNs [0, npfns): two bytes per PFN, nothing else per page."""

    def __init__(self, npfns: int, params: HeatParams | None = None) -> None:
        self.params = params or HeatParams()
        self.heat = np.zeros(npfns, dtype=np.uint8)
        self.mark = np.zeros(npfns, dtype=np.uint8)
        self._rounds = 0  # rounds folded in so far
        # Bumped by every change to heat or marks, so views of them (the dashboard's
        # counts and strips) are recomputed only after one: each is a pass over the host.
        self.version = 0
        self._new_mark = _pack(WARM, 0, NEW_PAGE_COOLDOWN)
        self._set_params_tables()

    def _set_params_tables(self) -> None:
        p = self.params
        self._decay_lut = np.floor(np.arange(256) * p.decay).astype(np.uint8)
        self._initial = np.uint8(p.units(p.initial_heat))

    def set_params(self, params: HeatParams) -> None:
        """Swap in new parameters (a config reload); heat and marks are kept."""
        self.params = params
        self._set_params_tables()

    @property
    def npfns(self) -> int:
        return self.heat.size

    @property
    def nbytes(self) -> int:
        return self.heat.nbytes + self.mark.nbytes

    def tracked_count(self) -> int:
        return sum(int(np.count_nonzero(self.mark[start:start + PASS_CHUNK] & CLASS_MASK))
                   for start in range(0, self.npfns, PASS_CHUNK))

    # --- evidence ----------------------------------------------------------------

    def _clip(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        """PFNs as indices, dropping any beyond the model (hot-added memory, bad input)."""
        index = np.asarray(pfns, dtype=np.uint64)
        return index[index < np.uint64(self.npfns)].astype(np.intp)

    def track(self, pfns: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """Start tracking these PFNs (those already tracked, or pinned, keep their state).

        Returns the PFNs that are new, for the caller's safety checks.
        """
        self.version += 1
        index = self._clip(pfns)
        marks = self.mark[index]
        new: npt.NDArray[np.intp] = index[((marks & CLASS_MASK) == 0) & (marks != PINNED)]
        self.heat[new] = self._initial
        self.mark[new] = self._new_mark
        return new.astype(np.uint64)

    def _add(self, index: npt.NDArray[np.intp], units: npt.NDArray[np.int64] | int) -> None:
        total = self.heat[index].astype(np.int64) + units
        self.heat[index] = np.minimum(total, HEAT_MAX).astype(np.uint8)

    def add_idle_scan(self, scan: IdleScan) -> Iterator[npt.NDArray[np.uint64]]:
        """Fold one idle-bitmap scan in: accessed pages heat up; non-LRU PFNs become untracked.

        Yields the newly tracked PFNs chunk by chunk, as each chunk is folded in.
        """
        start = scan.pfn_start
        end = min(self.npfns, start + scan.idle_age.size)
        # By chunk: a whole range's PFN indices would cost 8 bytes a PFN more.
        for low in range(start, end, IDLE_CHUNK):
            high = min(end, low + IDLE_CHUNK)
            yield self._add_idle_chunk(low, scan.idle_age[low - start:high - start])

    def _add_idle_chunk(self, start: int, ages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
        # Slices and byte masks, not PFN indices: every PFN of the chunk is touched, and
        # a gather or scatter by index costs several times a pass over a slice.
        u8 = np.uint8
        end = start + ages.size
        heat, mark = self.heat[start:end], self.mark[start:end]
        tracked = (ages != UNTRACKED).view(u8)
        mark *= tracked
        heat *= tracked
        new = tracked & ((mark & CLASS_MASK) == 0).view(u8) & (mark != PINNED).view(u8)
        keep = u8(1) - new
        heat *= keep
        heat += new * self._initial
        mark *= keep
        mark += new * self._new_mark
        add = (ages == 0).view(u8) * u8(self.params.units(self.params.idle_access_weight))
        np.minimum(heat, u8(HEAT_MAX) - add, out=heat)  # saturates at HEAT_MAX
        heat += add
        return np.flatnonzero(new).astype(np.uint64) + np.uint64(start)

    def add_samples(self, batch: SampleBatch) -> npt.NDArray[np.uint64]:
        """Each sample adds sample_weight to its PFN; sampled PFNs are tracked (new returned)."""
        return self._add_samples(batch)[1]

    def _add_samples(self, batch: SampleBatch
                     ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
        """add_samples(), also returning the sampled PFNs (as indices, once each)."""
        index = self._clip(batch.pfns)
        if index.size == 0:
            return index, np.zeros(0, dtype=np.uint64)
        unique, counts = np.unique(index, return_counts=True)
        new = self.track(unique.astype(np.uint64))
        self._add(unique, counts.astype(np.int64) * self.params.units(self.params.sample_weight))
        return unique, new

    def add_regions(self, batch: RegionBatch) -> None:
        """A DAMON region's access rate heats every PFN of it (tracked or not)."""
        if batch.max_nr_accesses <= 0:
            return
        rate = np.minimum(batch.nr_accesses, batch.max_nr_accesses) / batch.max_nr_accesses
        strength = np.minimum(1.0, rate / self.params.region_hot_rate)
        units = np.rint(strength * self.params.units(self.params.region_weight)).astype(np.int64)
        starts = np.minimum(batch.pfn_start, self.npfns).astype(np.intp)
        ends = np.minimum(batch.pfn_end, self.npfns).astype(np.intp)
        lengths = np.maximum(ends - starts, 0)
        short = lengths <= SHORT_REGION_PFNS
        for start, end, add in zip(starts[~short], ends[~short], units[~short], strict=True):
            if add:
                view = self.heat[start:end]
                view[:] = np.minimum(view.astype(np.int64) + add, HEAT_MAX)
        # Short regions (DAMON vaddr pages translated to PFN runs) may be hundreds of
        # thousands: one fancy-indexed add for all of them, not a slice each.
        lengths = lengths[short]
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        self._add(np.repeat(starts[short], lengths) + offsets, np.repeat(units[short], lengths))

    # --- moves -------------------------------------------------------------------

    def vacate(self, pfns: npt.NDArray[np.uint64]) -> None:
        """These frames were moved away from: nothing of ours lives there now."""
        self.version += 1
        index = self._clip(pfns)
        self.heat[index] = 0
        self.mark[index] = 0

    def transfer(self, old: npt.NDArray[np.uint64], new: npt.NDArray[np.uint64]) -> None:
        """Moved pages: heat follows them to their new PFNs, with a fresh cooldown."""
        old_i = np.asarray(old, dtype=np.uint64)
        new_i = np.asarray(new, dtype=np.uint64)
        keep = (old_i < np.uint64(self.npfns)) & (new_i < np.uint64(self.npfns)) & (new_i != 0)
        old_i, new_i = old_i[keep].astype(np.intp), new_i[keep].astype(np.intp)
        heat = self.heat[old_i]
        cls = self.mark[old_i] & CLASS_MASK
        self.vacate(old_i.astype(np.uint64))
        cooldown = np.uint8(min(COOLDOWN_MAX, self.params.cooldown_rounds) << COOLDOWN_SHIFT)
        self.heat[new_i] = heat
        self.mark[new_i] = cls | cooldown

    def pin(self, pfns: npt.NDArray[np.uint64]) -> None:
        """Frames the movers may not touch: no longer candidates, not re-tracked."""
        self.version += 1
        index = self._clip(pfns)
        self.heat[index] = 0
        self.mark[index] = PINNED

    def class_counts(self, start: int, end: int) -> tuple[int, int, int]:
        """Tracked PFNs in [start, end) by class: (cold, warm, hot)."""
        counts = [0, 0, 0]
        end = min(end, self.npfns)
        # Byte compares and counts: np.bincount would index through intp, 8 bytes a PFN.
        for low in range(start, end, PASS_CHUNK):
            chunk = classes(self.mark[low:min(low + PASS_CHUNK, end)])
            for i, cls in enumerate((COLD, WARM, HOT)):
                counts[i] += int(np.count_nonzero(chunk == np.uint8(cls)))
        return counts[0], counts[1], counts[2]

    def unpin_all(self) -> None:
        """Let pinned frames be tracked again (their pages may have been freed or unlocked)."""
        self.version += 1
        for start in range(0, self.npfns, CHUNK):
            chunk = self.mark[start:start + CHUNK]
            chunk[chunk == PINNED] = 0

    def cool_down(self, pfns: npt.NDArray[np.uint64]) -> None:
        """Pages that stayed put after a failed or skipped move: do not retry them at once."""
        self.version += 1
        index = self._clip(pfns)
        cooldown = np.uint8(min(COOLDOWN_MAX, self.params.cooldown_rounds) << COOLDOWN_SHIFT)
        self.mark[index] = (self.mark[index] & ~COOLDOWN_MASK) | cooldown

    # --- the interval boundary -------------------------------------------------

    def fold(self, idle: Iterable[IdleScan] = (), samples: Iterable[SampleBatch] = (),
             regions: Iterable[RegionBatch] = (), new_round: bool = True,
             on_new: Callable[[npt.NDArray[np.uint64]], object] = lambda _: None) -> None:
        """One interval: (decay, if a round starts,) add the evidence, reclassify.

        The newly tracked PFNs go to `on_new` a chunk at a time, before the classes are
        recomputed (the first scan of a host finds every user page new).
        """
        self.version += 1
        if new_round:
            self.decay()
        # The first round's pages predate tierd: no new page's cooldown for them.
        first = new_round and self._rounds == 0
        self._new_mark = _pack(WARM, 0, 0 if first else NEW_PAGE_COOLDOWN)
        spans: list[tuple[int, int]] = []  # where this interval's evidence changed heat
        sampled: list[npt.NDArray[np.intp]] = []
        whole = new_round  # regions may heat any PFN: then every PFN is reclassified
        try:
            for scan in idle:
                spans.append((scan.pfn_start, scan.pfn_start + scan.idle_age.size))
                for part in self.add_idle_scan(scan):
                    on_new(part)
            for batch in samples:
                index, new = self._add_samples(batch)
                sampled.append(index)
                on_new(new)
            for region_batch in regions:
                whole = True
                self.add_regions(region_batch)
        finally:
            self._new_mark = _pack(WARM, 0, NEW_PAGE_COOLDOWN)
        if whole:
            self.classify(advance=new_round)
        else:
            self._reclassify(spans, sampled)
        self._rounds += int(new_round)

    def decay(self) -> None:
        """Age every PFN's heat by one round (before the round's evidence is added)."""
        for start in range(0, self.npfns, PASS_CHUNK):
            chunk = self.heat[start:start + PASS_CHUNK]
            np.take(self._decay_lut, chunk, out=chunk)

    def classify(self, advance: bool = True) -> None:
        """Recompute classes from heat; with `advance` (a new round) count streaks and tick
        cooldowns down. A class change always restarts the streak at 1."""
        hot, cold = np.uint8(self.params.hot_units), np.uint8(self.params.cold_units)
        for start in range(0, self.npfns, PASS_CHUNK):
            end = start + PASS_CHUNK
            self._classify_chunk(self.heat[start:end], self.mark[start:end], hot, cold,
                                 np.uint8(advance))

    def _reclassify(self, spans: list[tuple[int, int]],
                    sampled: list[npt.NDArray[np.intp]]) -> None:
        """Recompute classes where evidence changed heat, within a round (no streak or
        cooldown ticks): classify(advance=False) at the cost of the evidence, not of
        the host (within a round only samples and DAMON regions arrive, and regions
        take the whole pass; an idle scan ends a round). Elsewhere that pass would
        change nothing, as every mark's class follows its heat between folds; the one
        exception, pages tracked from the mover's list, arises only without idle
        scans, and then every interval is a round."""
        hot, cold, still = (np.uint8(self.params.hot_units), np.uint8(self.params.cold_units),
                            np.uint8(0))
        for start, end in spans:
            for low in range(start, min(end, self.npfns), PASS_CHUNK):
                high = min(end, low + PASS_CHUNK)
                self._classify_chunk(self.heat[low:high], self.mark[low:high], hot, cold, still)
        if sampled:
            index = np.unique(np.concatenate(sampled))
            mark = self.mark[index]
            self._classify_chunk(self.heat[index], mark, hot, cold, still)
            self.mark[index] = mark

    @staticmethod
    def _classify_chunk(heat: npt.NDArray[np.uint8], mark: npt.NDArray[np.uint8],
                        hot: np.uint8, cold: np.uint8, advance: np.uint8) -> None:
        # Branch-free uint8 arithmetic (booleans viewed as 0/1 bytes): boolean
        # indexing and np.where are several times slower on random masks.
        u8 = np.uint8
        step = u8(1 << CLASS_SHIFT)
        old_cls = mark & CLASS_MASK
        new_cls = u8(WARM << CLASS_SHIFT) + (heat >= hot).view(u8) * step
        new_cls -= (heat <= cold).view(u8) * step
        same = (old_cls == new_cls).view(u8)
        streak = mark & STREAK_MASK
        streak += (streak < STREAK_MAX).view(u8) * advance
        streak -= u8(1)  # wraps at 0; the + 1 below wraps back
        streak *= same
        streak += u8(1)  # same class: streak + advance (saturating); new class: 1
        cooldown = mark >> u8(COOLDOWN_SHIFT)
        cooldown -= (cooldown > 0).view(u8) * advance
        cooldown <<= u8(COOLDOWN_SHIFT)
        cooldown |= new_cls
        cooldown |= streak
        cooldown *= (old_cls != 0).view(u8)
        cooldown |= mark * (old_cls == 0).view(u8)  # untracked (or pinned) stays so
        mark[:] = cooldown
