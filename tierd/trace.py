"""Evidence traces: what `tierd run --record FILE` saw each interval, for `tierd simulate`.

A trace is a zip file (deflated; idle ages compress well) with one folder
per interval:

    000001/meta.json      npfns, page size, interval, budget, node facts
    000001/idle0.npy      IdleScan ages (pfn_start in meta.json), one per scan
    000001/samples0.npy   SampleBatch PFNs (lost/unresolved counts in meta.json)
    000001/regions0.npz   RegionBatch arrays

Arrays are stored with numpy's .npy format and loaded without pickle.
Traces hold PFNs: they are as sensitive as the host's physical layout, so
the file is created mode 0600.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierd.collectors.evidence import IdleScan, RegionBatch, SampleBatch
from tierd.errors import TierdError
from tierd.vocabulary import NodeFacts

FORMAT_VERSION = 1


class TraceError(TierdError):
    """A trace file that cannot be read (names the file, entry and reason)."""


@dataclass
class IntervalRecord:
    npfns: int
    page_size: int
    interval_seconds: float
    budget_pages: int
    nodes: list[NodeFacts]
    idle: list[IdleScan] = field(default_factory=list)
    samples: list[SampleBatch] = field(default_factory=list)
    regions: list[RegionBatch] = field(default_factory=list)


def _npy(array: npt.NDArray[Any]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class TraceWriter:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # ZipFile does not close a file it was handed: close() closes both.
        self._file = os.fdopen(fd, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_DEFLATED)
        self._count = 0

    def write(self, record: IntervalRecord) -> None:
        self._count += 1
        folder = f"{self._count:06d}"
        meta = {
            "version": FORMAT_VERSION, "npfns": record.npfns, "page_size": record.page_size,
            "interval_seconds": record.interval_seconds, "budget_pages": record.budget_pages,
            "nodes": [asdict(n) for n in record.nodes],
            "idle": [{"pfn_start": s.pfn_start, "scanned_at": s.scanned_at}
                     for s in record.idle],
            "samples": [{"lost": b.lost, "unresolved": b.unresolved,
                         "collected_at": b.collected_at} for b in record.samples],
            "regions": [{"max_nr_accesses": b.max_nr_accesses, "collected_at": b.collected_at}
                        for b in record.regions],
        }
        self._zip.writestr(f"{folder}/meta.json", json.dumps(meta))
        for i, scan in enumerate(record.idle):
            self._zip.writestr(f"{folder}/idle{i}.npy", _npy(scan.idle_age))
        for i, batch in enumerate(record.samples):
            self._zip.writestr(f"{folder}/samples{i}.npy", _npy(batch.pfns))
        for i, regions in enumerate(record.regions):
            buffer = io.BytesIO()
            np.savez(buffer, pfn_start=regions.pfn_start, pfn_end=regions.pfn_end,
                     nr_accesses=regions.nr_accesses, age=regions.age)
            self._zip.writestr(f"{folder}/regions{i}.npz", buffer.getvalue())

    def close(self) -> None:
        try:
            self._zip.close()
        finally:
            self._file.close()


def _load(zf: zipfile.ZipFile, name: str) -> npt.NDArray[Any]:
    with zf.open(name) as f:
        array: npt.NDArray[Any] = np.load(io.BytesIO(f.read()), allow_pickle=False)
    return array


def _record(zf: zipfile.ZipFile, folder: str) -> IntervalRecord:
    meta = json.loads(zf.read(f"{folder}/meta.json"))
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('version')}, expected {FORMAT_VERSION}")
    nodes = [NodeFacts(**{**n, "ranges": tuple(tuple(r) for r in n["ranges"])})
             for n in meta["nodes"]]
    record = IntervalRecord(meta["npfns"], meta["page_size"], meta["interval_seconds"],
                            meta["budget_pages"], nodes)
    for i, m in enumerate(meta["idle"]):
        ages = _load(zf, f"{folder}/idle{i}.npy").astype(np.uint8)
        record.idle.append(IdleScan(int(m["pfn_start"]), ages, m["scanned_at"]))
    for i, m in enumerate(meta["samples"]):
        pfns = _load(zf, f"{folder}/samples{i}.npy").astype(np.uint64)
        record.samples.append(SampleBatch(pfns, m["lost"], m["unresolved"], m["collected_at"]))
    for i, m in enumerate(meta["regions"]):
        with zf.open(f"{folder}/regions{i}.npz") as f:
            arrays = np.load(io.BytesIO(f.read()), allow_pickle=False)
            record.regions.append(RegionBatch(
                arrays["pfn_start"].astype(np.uint64), arrays["pfn_end"].astype(np.uint64),
                arrays["nr_accesses"].astype(np.uint32), arrays["age"].astype(np.uint32),
                m["max_nr_accesses"], m["collected_at"]))
    return record


def read_trace(path: Path | str) -> Iterator[IntervalRecord]:
    """The intervals of a trace, in order; TraceError names the file and entry on bad input."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise TraceError(f"{path}: not a tierd trace: {e}") from None
    with zf:
        folders = sorted({n.split("/", 1)[0] for n in zf.namelist() if "/" in n})
        for folder in folders:
            try:
                yield _record(zf, folder)
            except (KeyError, ValueError, TypeError, zipfile.BadZipFile, OSError) as e:
                raise TraceError(f"{path}: {folder}: {e}") from None
