"""What collectors hand to the heat model: access evidence in PFN-scale arrays.

Three shapes, one per kind of source, all plain numpy arrays so the heat
model and the policy core stay pure and can be fed from a recorded trace:

- IdleScan (idle-page bitmap): one byte per PFN over a contiguous range.
- SampleBatch (perf IBS/PEBS, software events): the PFNs that were sampled.
- RegionBatch (DAMON): access counts per PFN range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# IdleScan.idle_age values: 0 = accessed during the last interval, n = idle
# for n consecutive scans (saturating at IDLE_AGE_MAX), UNTRACKED = not a
# user page on the LRU (kernel, free, reserved, or a huge page's tail).
IDLE_AGE_MAX = 254
UNTRACKED = 255


@dataclass(frozen=True)
class IdleScan:
    """Idle ages of the PFNs [pfn_start, pfn_start + idle_age.size)."""

    pfn_start: int
    idle_age: npt.NDArray[np.uint8]
    scanned_at: float  # time.monotonic() at the end of the scan


@dataclass(frozen=True)
class SampleBatch:
    """Memory-access samples of one interval, already resolved to PFNs.

    `pfns` may repeat (one entry per sample). Samples that could not be
    resolved are only counted, never guessed.
    """

    pfns: npt.NDArray[np.uint64]
    lost: int  # PERF_RECORD_LOST and ring overruns
    unresolved: int  # no physical address and the page no longer present
    collected_at: float


@dataclass(frozen=True)
class RegionBatch:
    """DAMON's view of one aggregation interval: access counts per PFN range.

    Region i covers [pfn_start[i], pfn_end[i]); nr_accesses[i] is out of
    max_nr_accesses (samples per aggregation interval); age[i] is how many
    aggregation intervals the region kept its access pattern.
    """

    pfn_start: npt.NDArray[np.uint64]
    pfn_end: npt.NDArray[np.uint64]
    nr_accesses: npt.NDArray[np.uint32]
    age: npt.NDArray[np.uint32]
    max_nr_accesses: int
    collected_at: float


@dataclass
class Evidence:
    """One interval's evidence from every collector, as the heat model folds it."""

    idle: list[IdleScan] = field(default_factory=list)
    samples: list[SampleBatch] = field(default_factory=list)
    regions: list[RegionBatch] = field(default_factory=list)
    # A round of evidence is complete: an idle scan was due, or there is no idle scan.
    new_round: bool = True

    def add(self, other: Evidence) -> None:
        """Fold another collector's evidence in; the round ends only if it ends for both."""
        self.idle.extend(other.idle)
        self.samples.extend(other.samples)
        self.regions.extend(other.regions)
        self.new_round = self.new_round and other.new_round
