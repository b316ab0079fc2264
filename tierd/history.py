"""Recent moves, so that a page sent back the way it came is seen and counted.

A page that moved, and whose new PFN is known (the PID mover follows each
page to its new frame), is recorded under that PFN with the direction and
the round of the move. A move in the direction opposite to the page's last
one within `window` rounds is a ping-pong, counted for the operator. The
phys mover does not learn new PFNs, so its moved pages are not recorded.

Nothing is held back on this record: a hold measured in the lab kept part
of a swapped hot set on the slow node for most of its window, while churn
without it stayed near 1.2 (docs/policy.md).

Memory grows with moves, not with the host: at most `window` rounds of the
move budget, 17 bytes each.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from tierd.vocabulary import Direction

_CODE = {Direction.PROMOTE: 1, Direction.DEMOTE: -1}


class MoveHistory:
    def __init__(self, window: int) -> None:
        self.window = window
        self.round = 0
        self._pfn = np.zeros(0, dtype=np.uint64)  # ascending
        self._round = np.zeros(0, dtype=np.int64)
        self._direction = np.zeros(0, dtype=np.int8)

    def __len__(self) -> int:
        return int(self._pfn.size)

    def advance(self) -> None:
        """A new round: forget the moves that left the window."""
        self.round += 1
        keep = self._round > self.round - self.window
        self._pfn, self._round = self._pfn[keep], self._round[keep]
        self._direction = self._direction[keep]

    def record(self, pfns: npt.NDArray[np.uint64], direction: Direction) -> None:
        """Pages that just moved `direction` and now live at `pfns`."""
        pfns = np.unique(np.asarray(pfns, dtype=np.uint64))
        self.forget(pfns)
        pfn = np.concatenate((self._pfn, pfns))
        order = np.argsort(pfn, kind="stable")
        self._pfn = pfn[order]
        self._round = np.concatenate((self._round, np.full(pfns.size, self.round)))[order]
        self._direction = np.concatenate(
            (self._direction, np.full(pfns.size, _CODE[direction], dtype=np.int8)))[order]

    def forget(self, pfns: npt.NDArray[np.uint64]) -> None:
        """Frames whose page left (or was never ours): their record no longer applies."""
        if not self._pfn.size or not len(pfns):
            return
        keep = ~np.isin(self._pfn, np.asarray(pfns, dtype=np.uint64), assume_unique=False)
        self._pfn, self._round = self._pfn[keep], self._round[keep]
        self._direction = self._direction[keep]

    def reversals(self, pfns: npt.NDArray[np.uint64], direction: Direction) -> int:
        """How many of `pfns` last moved the other way within the window (ping-pongs)."""
        if not self._pfn.size:
            return 0
        at = np.searchsorted(self._pfn, np.asarray(pfns, dtype=np.uint64))
        at = np.minimum(at, self._pfn.size - 1)
        found = self._pfn[at] == pfns
        return int(np.count_nonzero(found & (self._direction[at] == -_CODE[direction])))
