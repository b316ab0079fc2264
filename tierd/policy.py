"""The policy core: heat and marks in, batches of PFNs to move out. Pure: no kernel access.

For every node that has a slower tier below it, the policy keeps its free
memory above `keep_free_pages` (its high/promo watermark plus a headroom)
while hot pages wait below it:

- below that level, demote the coldest pages first (settled cold ones, then
  any non-hot page) to the node's demotion target, one tier down, one page
  for each hot page waiting: the room is for them, so a few waiting cost a
  few demotions, and with none waiting tierd demotes nothing, even below
  the watermark (the kernel's reclaim keeps that): a workload whose memory
  fits the node loses no page to tierd;
- above it, promote the hottest settled-hot pages of the nodes one tier
  down, as far as the room allows;
- when hot pages are waiting below and the node has no room, exchange:
  demote one settled-cold page for every page promoted; below that level
  the promotions may take the room their exchange made
  (`Plan.promotion_floor`), else a deficit larger than the pages waiting
  would hold every promotion back until the headroom were whole;
- with `demote_cold` (off by default), settled-cold pages go down anyway, as
  far as the node below has room. Off, a cold page leaves only when its room
  is needed: a demotion the node does not need is traffic for nothing, and a
  fast tier is worth most when it is full.

"Settled" is the hysteresis: a page must have been in its class for
`hysteresis_rounds` consecutive rounds and be out of its cooldown (see
tierd.heat). A move into free room displaces nothing, so a page hot in one
round may take it; an exchange displaces a page, so only settled-hot pages
take part. Evidence can settle a hot page sooner: heat of `settle_units`
(twice the hot threshold) says within one round what two rounds of idle
scans say. Idle evidence alone never reaches it (its heat stays below
twice an access's weight); perf samples and DAMON regions, which count
accesses within a round, can. A round is one idle scan, which a large host
paces over minutes, so on such a host sampled evidence is what lets an
exchange happen within intervals.

The interval's budget (pages) is split between promotion and demotion; a
direction that needs less leaves the rest to the other.

One pass costs a few whole-array numpy operations per chunk and no sort:
each PFN's (category, heat) pair is a 10-bit key, one bincount per chunk
gives every node's heat histograms, and the cut-off heat for "the k coldest"
or "the k hottest" is read off the cumulative histogram.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from tierd import heat as h
from tierd.vocabulary import Batch, Direction, NodeFacts

# Move categories. With no cooldown left a mark byte is (class << 3) | streak,
# so each category is a few ranges of mark values: uint8 compares, no lookups.


class Category(IntEnum):
    NONE = 0  # not a candidate: untracked, pinned, or in its cooldown
    COLD_SETTLED = 1  # cold for the hysteresis: demoted first
    NOT_HOT = 2  # any other movable page that is not hot: demoted when needed
    HOT_SETTLED = 3  # hot for the hysteresis: promoted, also in exchange for a cold page
    HOT_FRESH = 4  # hot, settled or not (includes HOT_SETTLED): promoted into free room


NONE, COLD_SETTLED, NOT_HOT, HOT_SETTLED, HOT_FRESH = Category
NCAT = len(Category)
# Above this many PFNs per node, heat histograms are estimated from an evenly
# strided sample (counts stay exact); selection then trims to the exact k.
EXACT_HISTOGRAM_PFNS = 1 << 22


@dataclass(frozen=True)
class PolicyParams:
    hysteresis_rounds: int = 1  # consecutive rounds in a class before a move
    promote_share: float = 0.5  # of the interval's budget, when both directions want it
    demote_cold: bool = False  # demote settled-cold pages even above the headroom
    settle_units: int = 128  # heat that settles a hot page before its hysteresis


@dataclass(frozen=True)
class NodeTarget:
    """One node as the policy sees it this interval (page counts, PFN ranges)."""

    node: int
    tier: int  # rank, 0 = fastest
    ranges: tuple[tuple[int, int], ...]  # [start, end) PFNs of this node
    free_pages: int
    keep_free_pages: int  # watermark + headroom: promote above; demote below for them
    promote_to: int | None = None  # a node one tier up
    demote_to: int | None = None  # a node one tier down


def targets(facts: list[NodeFacts], headroom_percent: float) -> list[NodeTarget]:
    """NodeTargets from node facts: keep watermark + headroom free; neighbours one tier away.

    Of several nodes one tier up (down), the one with the most free pages is the target.
    """
    by_tier: dict[int, list[NodeFacts]] = defaultdict(list)
    for f in facts:
        by_tier[f.tier].append(f)

    def roomiest(tier: int) -> int | None:
        nodes = by_tier.get(tier)
        return max(nodes, key=lambda f: (f.free_pages, -f.node)).node if nodes else None

    return [NodeTarget(
        node=f.node, tier=f.tier, ranges=f.ranges, free_pages=f.free_pages,
        keep_free_pages=f.watermark_pages + int(f.managed_pages * headroom_percent / 100),
        promote_to=roomiest(f.tier - 1), demote_to=roomiest(f.tier + 1),
    ) for f in facts]


@dataclass(frozen=True)
class Plan:
    # Demotions first (they make the room promotions need), each group by target node.
    batches: tuple[Batch, ...] = ()
    deferred_pages: int = 0  # moves the policy wanted but the budget held back
    # Per receiving node, the free pages its promotions leave: keep_free_pages, or less
    # while the headroom comes back one page per hot page waiting, so the pages demoted
    # in exchange are room for the promotions they were demoted for.
    promotion_floor: dict[int, int] = field(default_factory=dict)

    def pages(self, direction: Direction | None = None) -> int:
        return sum(b.pfns.size for b in self.batches
                   if direction is None or b.direction is direction)


@dataclass
class _Counts:
    """How many pages of one node to move, decided from histograms alone."""

    demote: int = 0
    promote_from: dict[int, int] = field(default_factory=dict)  # source node -> pages
    floor: int | None = None  # free pages left under the promotions (Plan.promotion_floor)
    promote_category: Category = HOT_SETTLED  # HOT_FRESH when every promotion fits the room


def mark_ranges(category: Category, hysteresis: int) -> tuple[tuple[int, int], ...]:
    """Inclusive ranges of mark values (cooldown over) that fall in `category`."""
    hyst = max(0, min(h.STREAK_MAX, hysteresis))
    cold, warm, hot = (c << h.CLASS_SHIFT for c in (h.COLD, h.WARM, h.HOT))
    if category == COLD_SETTLED:
        return ((cold + hyst, cold + h.STREAK_MAX),)
    if category == HOT_SETTLED:
        return ((hot + hyst, hot + h.STREAK_MAX),)
    if category == HOT_FRESH:
        return ((hot, hot + h.STREAK_MAX),)
    if category == NOT_HOT:  # every movable non-hot page that is not settled cold
        return ((cold, cold + hyst - 1), (warm, warm + h.STREAK_MAX))
    raise ValueError(f"no mark ranges for category {category}")


def _in_category(mark: npt.NDArray[np.uint8], ranges: tuple[tuple[int, int], ...]
                 ) -> npt.NDArray[np.bool_]:
    """Which of `mark` fall in the mark ranges."""
    inside: npt.NDArray[np.bool_] | None = None
    for low, high in ranges:
        if low <= high:
            # One compare a range: below `low` the uint8 difference wraps past `high - low`.
            part = (mark - np.uint8(low)) <= np.uint8(high - low)
            inside = part if inside is None else inside | part
    return np.zeros(mark.shape, dtype=np.bool_) if inside is None else inside


def _members(category: Category, heat: npt.NDArray[np.uint8], mark: npt.NDArray[np.uint8],
            params: PolicyParams) -> npt.NDArray[np.bool_]:
    """Which PFNs of a chunk (its heat and marks) fall in `category`."""
    if category != HOT_SETTLED or params.settle_units > h.HEAT_MAX:
        return _in_category(mark, mark_ranges(category, params.hysteresis_rounds))
    # Hot and out of its cooldown, then settled by its streak or by its heat.
    fresh = _in_category(mark, mark_ranges(HOT_FRESH, params.hysteresis_rounds))
    (settled_low, _), = mark_ranges(HOT_SETTLED, params.hysteresis_rounds)
    return fresh & ((mark >= np.uint8(settled_low)) | (heat >= np.uint8(params.settle_units)))


def chunks(ranges: tuple[tuple[int, int], ...], npfns: int, step: int = h.CHUNK
            ) -> Iterator[tuple[int, int]]:
    for start, end in ranges:
        end = min(end, npfns)
        for s in range(start, end, step):
            yield s, min(end, s + step)


def _span(ranges: tuple[tuple[int, int], ...], npfns: int) -> int:
    return sum(max(0, min(e, npfns) - s) for s, e in ranges)


def histograms(heat: npt.NDArray[np.uint8], mark: npt.NDArray[np.uint8],
               ranges: tuple[tuple[int, int], ...], params: PolicyParams
               ) -> npt.NDArray[np.int64]:
    """[category, heat] -> pages of these PFN ranges (estimated beyond EXACT_HISTOGRAM_PFNS)."""
    stride = max(1, -(-_span(ranges, heat.size) // EXACT_HISTOGRAM_PFNS))
    hist = np.zeros((NCAT, 256), dtype=np.int64)
    for cat in (COLD_SETTLED, NOT_HOT, HOT_SETTLED, HOT_FRESH):
        exact, sampled = 0, np.zeros(256, dtype=np.int64)
        for s, e in chunks(ranges, heat.size):
            inside = _members(cat, heat[s:e], mark[s:e], params)
            exact += int(np.count_nonzero(inside))
            sample = inside[::stride]
            sampled += np.bincount(heat[s:e][::stride][sample], minlength=256)
        total = int(sampled.sum())
        if stride == 1 or total == 0:
            hist[cat] = sampled
        else:  # scale the sample to the exact count, keeping whole pages
            hist[cat] = np.floor(sampled * (exact / total)).astype(np.int64)
            hist[cat][int(np.argmax(sampled))] += exact - int(hist[cat].sum())
    return hist


def _waiting(nodes: dict[int, NodeTarget], hist: dict[int, npt.NDArray[np.int64]],
             category: Category) -> dict[int, dict[int, int]]:
    """receiver -> source -> pages of `category` waiting one tier below the receiver."""
    waiting: dict[int, dict[int, int]] = defaultdict(dict)
    for n, t in nodes.items():
        if t.promote_to in nodes:
            waiting[t.promote_to][n] = int(hist[n][category].sum())
    return waiting


def _promotions(settled: int, fresh: int, room: int, exchange: int, left: int
                ) -> tuple[int, Category]:
    """(pages, category) to promote into one node: settled-hot pages may displace
    cold ones (room + exchange), any hot page may take free room alone."""
    by_settled = min(settled, left, room + exchange)
    by_fresh = min(fresh, left, room)
    if by_fresh > by_settled:
        return by_fresh, HOT_FRESH
    return by_settled, HOT_SETTLED


def _deficit(t: NodeTarget, free: int, waiting: int) -> int:
    """Pages to demote for room: back up to the headroom, one page for each hot page
    waiting below, so a handful of them never costs a whole headroom of demotions;
    none with none waiting (below the watermark the kernel reclaims on its own)."""
    return min(max(0, t.keep_free_pages - free), waiting)


def _allocate(nodes: dict[int, NodeTarget], hist: dict[int, npt.NDArray[np.int64]],
              budget: int, params: PolicyParams) -> dict[int, _Counts]:
    """Page counts per node: what to demote from it and promote into it, within budget."""
    free = {n: t.free_pages for n, t in nodes.items()}
    settled = _waiting(nodes, hist, HOT_SETTLED)
    fresh = _waiting(nodes, hist, HOT_FRESH)
    promote_demand, demote_demand = 0, 0
    for n, t in nodes.items():
        if t.demote_to not in nodes:
            continue
        room = t.free_pages - t.keep_free_pages
        cold = int(hist[n][COLD_SETTLED].sum())
        hot_below = sum(settled[n].values())
        promote_demand += max(min(hot_below, max(0, room) + cold),
                              min(sum(fresh[n].values()), max(0, room)))
        # Demotions needed: the deficit, and one per promoted page that does not
        # fit into the room.
        needed = (_deficit(t, t.free_pages, sum(fresh[n].values()))
                  + max(0, min(hot_below, cold) - max(0, room)))
        demote_demand += max(needed, cold) if params.demote_cold else needed
    promote_left = min(promote_demand, max(round(budget * params.promote_share),
                                           budget - demote_demand))
    demote_left = budget - promote_left
    out: dict[int, _Counts] = {}
    for n in sorted(nodes, key=lambda n: (nodes[n].tier, n)):
        t = nodes[n]
        counts = out.setdefault(n, _Counts())
        target = t.demote_to if t.demote_to in nodes else None
        room = free[n] - t.keep_free_pages
        n_cold = int(hist[n][COLD_SETTLED].sum())
        n_any = n_cold + int(hist[n][NOT_HOT].sum())
        demote_cap = 0
        if target is not None:
            target_room = max(0, free[target] - nodes[target].keep_free_pages)
            demote_cap = min(demote_left, target_room, n_any)
        need = min(_deficit(t, free[n], sum(fresh[n].values())), demote_cap)
        exchange = max(0, min(n_cold - min(n_cold, need), demote_cap - need))
        promote, category = _promotions(sum(settled[n].values()), sum(fresh[n].values()),
                                        max(0, room), exchange, promote_left)
        demote = need + max(0, promote - max(0, room))
        if params.demote_cold:
            demote = max(demote, min(n_cold, demote_cap))
        counts.demote = demote
        counts.promote_category = category
        if target is not None:
            counts.floor = min(t.keep_free_pages, free[n] + need)
        promote_left -= promote
        demote_left -= demote
        free[n] += demote - promote
        if target is not None:
            free[target] -= demote
        waiting = settled[n] if category == HOT_SETTLED else fresh[n]
        for source, pages in sorted(waiting.items()):
            take = min(pages, promote)
            if take:
                counts.promote_from[source] = take
                free[source] += take
                promote -= take
    return out


def _cut(hist: npt.NDArray[np.int64], k: int, coldest: bool) -> int:
    """Heat cut-off t: the k coldest (hottest) pages have heat <= t (>= t)."""
    order = hist if coldest else hist[::-1]
    i = int(np.searchsorted(np.cumsum(order), k))
    i = min(i, 255)
    return i if coldest else 255 - i


def _select(heat: npt.NDArray[np.uint8], mark: npt.NDArray[np.uint8],
            ranges: tuple[tuple[int, int], ...], params: PolicyParams, category: Category,
            hist: npt.NDArray[np.int64], k: int, coldest: bool) -> npt.NDArray[np.uint64]:
    """The k coldest (or hottest) PFNs of `category` in `ranges`, ascending.

    Pages strictly beyond the cut-off are all taken (their number is below k
    when the histogram is exact; otherwise trimmed by heat); the rest come
    from the cut-off bin, lowest PFNs first.
    """
    if k <= 0:
        return np.zeros(0, dtype=np.uint64)
    t = np.uint8(_cut(hist, k, coldest))
    beyond, at_cut = [], []
    remaining = k
    for s, e in chunks(ranges, heat.size):
        chunk_heat = heat[s:e]
        inside = _members(category, chunk_heat, mark[s:e], params)
        strict = inside & ((chunk_heat < t) if coldest else (chunk_heat > t))
        beyond.append(np.flatnonzero(strict).astype(np.uint64) + np.uint64(s))
        if remaining > 0:
            equal = np.flatnonzero(inside & (chunk_heat == t))[:remaining]
            at_cut.append(equal.astype(np.uint64) + np.uint64(s))
            remaining -= equal.size
    strict_pfns = np.concatenate(beyond)
    if strict_pfns.size >= k:  # an estimated histogram put too many beyond the cut
        order = heat[strict_pfns.astype(np.intp)].astype(np.int16)
        keep = np.argpartition(order if coldest else -order, k - 1)[:k]
        return np.sort(strict_pfns[keep])
    cut_pfns = np.concatenate(at_cut)[: k - strict_pfns.size]
    return np.sort(np.concatenate((strict_pfns, cut_pfns)))


def _demotions(heat: npt.NDArray[np.uint8], mark: npt.NDArray[np.uint8], t: NodeTarget,
               params: PolicyParams, hist: npt.NDArray[np.int64], k: int
               ) -> npt.NDArray[np.uint64]:
    """The k coldest movable pages of node t: settled-cold ones first."""
    cold = int(hist[COLD_SETTLED].sum())
    from_cold = min(k, cold)
    pfns = [_select(heat, mark, t.ranges, params, COLD_SETTLED, hist[COLD_SETTLED],
                    from_cold, coldest=True)]
    if k > from_cold:
        pfns.append(_select(heat, mark, t.ranges, params, NOT_HOT, hist[NOT_HOT],
                            k - from_cold, coldest=True))
    return np.sort(np.concatenate(pfns))


def decide(heat: npt.NDArray[np.uint8], mark: npt.NDArray[np.uint8],
           nodes: list[NodeTarget], budget_pages: int, params: PolicyParams | None = None
           ) -> Plan:
    """One decision pass: which PFNs move where this interval."""
    params = params or PolicyParams()
    by_id = {t.node: t for t in nodes}
    hist = {n: histograms(heat, mark, t.ranges, params) for n, t in by_id.items()}
    counts = _allocate(by_id, hist, budget_pages, params)
    unlimited = _allocate(by_id, hist, heat.size, params)
    wanted = sum(c.demote + sum(c.promote_from.values()) for c in unlimited.values())
    demotions, promotions = [], []
    for n, c in counts.items():
        t = by_id[n]
        if c.demote and t.demote_to is not None:
            pfns = _demotions(heat, mark, t, params, hist[n], c.demote)
            demotions.append(Batch(Direction.DEMOTE, n, t.demote_to, pfns))
        for source, k in c.promote_from.items():
            s = by_id[source]
            cat = c.promote_category
            pfns = _select(heat, mark, s.ranges, params, cat, hist[source][cat], k,
                           coldest=False)
            promotions.append(Batch(Direction.PROMOTE, source, n, pfns))
    batches = sorted(demotions, key=lambda b: b.target) + sorted(promotions, key=lambda b: b.target)
    planned = sum(b.pfns.size for b in batches)
    return Plan(tuple(batches), deferred_pages=max(0, wanted - planned),
                promotion_floor={n: c.floor for n, c in counts.items() if c.floor is not None})
