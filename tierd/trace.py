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

import contextlib
import errno
import io
import json
import math
import os
import stat
import tempfile
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
    """Appends one folder per interval, each closed as a whole zip on disk.

    The file is a new inode, mode 0600, created under a random name beside
    `path` and renamed onto it: a symlink or another user's file at `path` is
    replaced, never followed or reused. After each interval the zip's central
    directory is rewritten, so a killed daemon leaves a trace readable up to
    its last complete interval (unless killed inside the write of the next,
    which overwrites the directory: a window of the write's length).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self._file = _create(self.path)
        except OSError as e:
            raise TraceError(f"{self.path}: cannot record: {e.strerror or e}") from None
        self._count = 0

    def write(self, record: IntervalRecord) -> None:
        """One interval's folder; TraceError (the file stays readable) if it cannot be written."""
        try:
            # "a" reads the directory written after the last interval and writes
            # the new folder over it, then a new directory after it.
            with zipfile.ZipFile(self._file, "a" if self._count else "w",
                                 compression=zipfile.ZIP_DEFLATED) as zf:
                _write_folder(zf, f"{self._count + 1:06d}", record)
            self._file.flush()
        except OSError as e:
            raise TraceError(f"{self.path}: cannot record interval {self._count + 1}: "
                             f"{e.strerror or e}") from None
        self._count += 1

    def close(self) -> None:
        self._file.close()


def _create(path: Path) -> io.BufferedRandom:
    """A new, empty 0600 file at `path` (see TraceWriter)."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, "exists and is not a regular file")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.rename(temporary, path)
    except OSError:
        os.close(fd)
        os.unlink(temporary)
        raise
    return os.fdopen(fd, "w+b")


def _write_folder(zf: zipfile.ZipFile, folder: str, record: IntervalRecord) -> None:
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
    zf.writestr(f"{folder}/meta.json", json.dumps(meta))
    for i, scan in enumerate(record.idle):
        zf.writestr(f"{folder}/idle{i}.npy", _npy(scan.idle_age))
    for i, batch in enumerate(record.samples):
        zf.writestr(f"{folder}/samples{i}.npy", _npy(batch.pfns))
    for i, regions in enumerate(record.regions):
        buffer = io.BytesIO()
        np.savez(buffer, pfn_start=regions.pfn_start, pfn_end=regions.pfn_end,
                 nr_accesses=regions.nr_accesses, age=regions.age)
        zf.writestr(f"{folder}/regions{i}.npz", buffer.getvalue())


# --- reading: every size checked against the file and the memory budget first ---------

MEMORY_BUDGET = 4 << 30  # bytes a replay may allocate; a bigger trace is refused, not tried
HEAT_BYTES_PER_PFN = 16  # the heat model's two bytes plus the policy's temporaries
MAX_META_BYTES = 1 << 20
NPY_HEADER_MAX = 1 << 16
MAX_PAGE_SIZE = 1 << 30
MAX_PAGES = 1 << 52  # page counts are only compared and summed, never allocated
# DAMON regions do not overlap; the PFN runs of vaddr regions may a little (shared pages).
MAX_REGION_COVER = 4  # x npfns


class _Bad(Exception):
    """A reason the trace cannot be replayed (becomes TraceError with file and entry)."""


def _int(meta: dict[str, Any], key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if type(value) is not int or not low <= value <= high:
        raise _Bad(f"{key} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def _number(meta: dict[str, Any], key: str) -> float:
    value = meta.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or \
            not math.isfinite(value) or value < 0:
        raise _Bad(f"{key} must be a finite number >= 0, got {_short(value)}")
    return float(value)


def _list(meta: dict[str, Any], key: str, limit: int = 1 << 16) -> list[dict[str, Any]]:
    value = meta.get(key)
    if not isinstance(value, list) or len(value) > limit or \
            not all(isinstance(v, dict) for v in value):
        raise _Bad(f"{key} must be a list of at most {limit} objects")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _load(zf: zipfile.ZipFile, name: str, budget: int) -> npt.NDArray[Any]:
    """The .npy entry `name`, its header checked against its size and `budget` first."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise _Bad(f"{name} missing") from None
    if info.file_size > budget:
        raise _Bad(f"{name}: {info.file_size} bytes, over the memory budget ({budget})")
    with zf.open(info) as f:  # reads at most file_size bytes, whatever the data inflates to
        data = f.read()
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)  # type: ignore[no-untyped-call]
        header = {(1, 0): np.lib.format.read_array_header_1_0,
                  (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if header is None:
            raise ValueError(f".npy version {version}")
        shape, _, dtype = header(buffer)  # type: ignore[no-untyped-call]
    except (ValueError, SyntaxError, TypeError) as e:
        raise _Bad(f"{name}: not a .npy array: {e}") from None
    if dtype.hasobject or dtype.kind not in "iu" or len(shape) != 1:
        raise _Bad(f"{name}: expected a one-dimensional array of integers, got {dtype} {shape}")
    if shape[0] * dtype.itemsize != len(data) - buffer.tell():
        raise _Bad(f"{name}: the header claims {shape[0]} items of {dtype.itemsize} bytes, "
                   f"the entry holds {len(data) - buffer.tell()} bytes")
    return np.frombuffer(data, dtype=dtype, offset=buffer.tell())


def _pfns(array: npt.NDArray[Any], name: str, npfns: int) -> npt.NDArray[np.uint64]:
    if array.size and (array.min() < 0 or array.max() > npfns):
        raise _Bad(f"{name}: PFNs outside [0, npfns={npfns}]")
    return array.astype(np.uint64)


def _nodes(meta: dict[str, Any], npfns: int) -> list[NodeFacts]:
    nodes = []
    for n in _list(meta, "nodes", 1024):
        ranges = n.get("ranges")
        if not isinstance(ranges, list) or len(ranges) > 1024 or not all(
                isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r)
                and 0 <= r[0] <= r[1] <= npfns for r in ranges):
            raise _Bad(f"nodes: ranges must be [start, end] pairs within [0, npfns={npfns}]")
        nodes.append(NodeFacts(
            node=_int(n, "node", 0, 1 << 16), tier=_int(n, "tier", 0, 1 << 16),
            ranges=tuple((a, b) for a, b in ranges),
            managed_pages=_int(n, "managed_pages", 0, MAX_PAGES),
            free_pages=_int(n, "free_pages", 0, MAX_PAGES),
            watermark_pages=_int(n, "watermark_pages", 0, MAX_PAGES)))
    return nodes


def _record(zf: zipfile.ZipFile, folder: str, budget: int) -> IntervalRecord:
    name = f"{folder}/meta.json"
    if name not in zf.NameToInfo or zf.getinfo(name).file_size > MAX_META_BYTES:
        raise _Bad(f"{name} missing or over {MAX_META_BYTES} bytes")
    meta = json.loads(zf.read(name))
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        raise _Bad(f"not format version {FORMAT_VERSION}")
    npfns = _int(meta, "npfns", 0, budget // HEAT_BYTES_PER_PFN)
    page_size = _int(meta, "page_size", 1, MAX_PAGE_SIZE)
    if page_size & (page_size - 1):
        raise _Bad(f"page_size must be a power of two, got {page_size}")
    record = IntervalRecord(npfns, page_size, _number(meta, "interval_seconds"),
                            _int(meta, "budget_pages", 0, 1 << 62), _nodes(meta, npfns))
    left = budget - npfns * HEAT_BYTES_PER_PFN
    for i, m in enumerate(_list(meta, "idle")):
        # Ages are at most one per PFN (of at most 8 bytes, with a header).
        ages = _load(zf, f"{folder}/idle{i}.npy", min(left, NPY_HEADER_MAX + 8 * npfns))
        start = _int(m, "pfn_start", 0, npfns - ages.size)
        left -= ages.nbytes
        record.idle.append(IdleScan(start, ages.astype(np.uint8), _number(m, "scanned_at")))
    for i, m in enumerate(_list(meta, "samples")):
        name = f"{folder}/samples{i}.npy"
        pfns = _pfns(_load(zf, name, left // 2), name, npfns - 1)
        left -= 2 * pfns.nbytes
        record.samples.append(SampleBatch(pfns, _int(m, "lost", 0, 1 << 62),
                                          _int(m, "unresolved", 0, 1 << 62),
                                          _number(m, "collected_at")))
    for i, m in enumerate(_list(meta, "regions")):
        batch = _regions(zf, f"{folder}/regions{i}.npz", m, npfns, left // 2)
        left -= 2 * sum(a.nbytes for a in (batch.pfn_start, batch.pfn_end, batch.nr_accesses))
        record.regions.append(batch)
    return record


def _regions(zf: zipfile.ZipFile, name: str, m: dict[str, Any], npfns: int,
             budget: int) -> RegionBatch:
    if name not in zf.NameToInfo or zf.getinfo(name).file_size > budget:
        raise _Bad(f"{name} missing or over the memory budget ({budget})")
    with zipfile.ZipFile(io.BytesIO(zf.read(name))) as npz:
        arrays = {key: _load(npz, f"{key}.npy", budget)
                  for key in ("pfn_start", "pfn_end", "nr_accesses", "age")}
    if len({a.size for a in arrays.values()}) != 1:
        raise _Bad(f"{name}: arrays of different lengths")
    start = _pfns(arrays["pfn_start"], name, npfns)
    end = _pfns(arrays["pfn_end"], name, npfns)
    if np.any(end < start) or int((end - start).sum()) > MAX_REGION_COVER * max(npfns, 1):
        raise _Bad(f"{name}: regions end before they start or cover over "
                   f"{MAX_REGION_COVER} x npfns")
    counts = arrays["nr_accesses"]
    if counts.size and (counts.min() < 0 or counts.max() > 1 << 31):
        raise _Bad(f"{name}: nr_accesses outside [0, 2^31]")
    return RegionBatch(start, end, counts.astype(np.uint32),
                       np.clip(arrays["age"], 0, 1 << 31).astype(np.uint32),
                       _int(m, "max_nr_accesses", 0, 1 << 31), _number(m, "collected_at"))


def read_trace(path: Path | str, budget: int = MEMORY_BUDGET) -> Iterator[IntervalRecord]:
    """The intervals of a trace, in order; TraceError names the file and entry on bad input.

    Nothing is allocated before its size is checked against the file and
    `budget` bytes: a hostile trace is refused, never half-replayed into a crash.
    """
    path = Path(path)
    try:
        file = _open_regular(path, budget)
        zf = zipfile.ZipFile(file)
    except (OSError, zipfile.BadZipFile, _Bad) as e:
        raise TraceError(f"{path}: not a tierd trace: {getattr(e, 'strerror', None) or e}") \
            from None
    with file, zf:
        folders = sorted({n.split("/", 1)[0] for n in zf.namelist() if "/" in n})
        for folder in folders:
            try:
                yield _record(zf, folder, budget)
            except (_Bad, KeyError, ValueError, TypeError, RecursionError, zipfile.BadZipFile,
                    EOFError, OSError, NotImplementedError) as e:
                raise TraceError(f"{path}: {folder}: {_clip(str(e))}") from None


def _open_regular(path: Path, budget: int) -> io.BufferedReader:
    # O_NONBLOCK: a FIFO is refused, not waited on.
    file = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb")
    st = os.fstat(file.fileno())
    if not stat.S_ISREG(st.st_mode) or st.st_size > budget:
        file.close()
        raise _Bad("not a regular file" if not stat.S_ISREG(st.st_mode) else
                   f"{st.st_size} bytes, over the memory budget ({budget})")
    return file


def _clip(text: str) -> str:
    return text if len(text) <= 300 else text[:297] + "..."
