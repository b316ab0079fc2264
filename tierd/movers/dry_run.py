"""What a dry run would have moved, counted once per decision.

Nothing moves in a dry run, so the policy picks the same pages again once
their cooldown ends; counting every pick would count one page many times.
The ledger remembers where the dry run would have sent each page it picked
(its PFN and target node), and a pick is a new decision only for a page
never picked before or picked now for another node.

Memory: 10 bytes per distinct page picked (two sorted parallel arrays),
dry run only. A frame freed and reused by another page that is then picked
for the same node is not counted again.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class WouldMoveLedger:
    def __init__(self) -> None:
        self.pfns = np.zeros(0, dtype=np.uint64)  # sorted
        self.targets = np.zeros(0, dtype=np.int16)  # parallel: node each would go to

    def record(self, pfns: npt.NDArray[np.uint64], target: int) -> int:
        """Note that the dry run would move `pfns` to `target`; how many are new decisions."""
        pfns = np.unique(pfns)
        at = np.searchsorted(self.pfns, pfns)
        known = at < self.pfns.size
        known[known] = self.pfns[at[known]] == pfns[known]
        new = int((~known).sum() + (self.targets[at[known]] != target).sum())
        self.targets[at[known]] = target
        self.pfns = np.insert(self.pfns, at[~known], pfns[~known])
        self.targets = np.insert(self.targets, at[~known], np.int16(target))
        return new
