"""The idle-page collector and the per-PFN files it reads (kpageflags, page_idle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tierd.errors import KernelFileError
from tierd.kernel import kpageflags as kpf
from tierd.kernel.root import HostRoot


def _write_u64(root: Path, kernel_path: str, values: np.ndarray) -> None:
    path = root / kernel_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.asarray(values, dtype=np.uint64).tobytes())


# --- /proc/kpageflags and friends ---------------------------------------------


def test_kpageflags_reads_a_range_and_fills_past_the_end_as_holes(tmp_path: Path) -> None:
    flags = np.arange(100, dtype=np.uint64) << np.uint64(32)
    _write_u64(tmp_path, kpf.KPAGEFLAGS, flags)
    with kpf.kpageflags(HostRoot(tmp_path)) as f:
        assert np.array_equal(f.read(10, 5), flags[10:15])
        tail = f.read(95, 10)
    assert np.array_equal(tail[:5], flags[95:])
    assert (tail[5:] == kpf.mask(kpf.KPF_NOPAGE)).all()


def test_kpagecount_and_kpagecgroup_fill_with_zero(tmp_path: Path) -> None:
    _write_u64(tmp_path, kpf.KPAGECOUNT, np.full(4, 3))
    _write_u64(tmp_path, kpf.KPAGECGROUP, np.full(4, 77))
    root = HostRoot(tmp_path)
    with kpf.kpagecount(root) as count, kpf.kpagecgroup(root) as cgroup:
        assert count.read(2, 4).tolist() == [3, 3, 0, 0]
        assert cgroup.read(0, 2).tolist() == [77, 77]


def test_read_into_reuses_the_callers_buffer(tmp_path: Path) -> None:
    _write_u64(tmp_path, kpf.KPAGEFLAGS, np.arange(64))
    buf = np.zeros(16, dtype=np.uint64)
    with kpf.kpageflags(HostRoot(tmp_path)) as f:
        assert f.read_into(48, buf) == 16
        assert buf[0] == 48
        assert f.read_into(56, buf) == 8
    assert buf[:8].tolist() == list(range(56, 64))


def test_flag_helpers_select_bits() -> None:
    flags = np.array(
        [0, 1 << kpf.KPF_LRU, (1 << kpf.KPF_LRU) | (1 << kpf.KPF_MLOCKED),
         1 << kpf.KPF_UNEVICTABLE, 1 << kpf.KPF_NOPAGE],
        dtype=np.uint64,
    )
    assert kpf.has_any(flags, kpf.KPF_LRU).tolist() == [False, True, True, False, False]
    assert kpf.unmovable(flags).tolist() == [False, False, True, True, True]
    assert kpf.mask(kpf.KPF_MLOCKED) == np.uint64(1 << 33)


def test_missing_kpageflags_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(KernelFileError, match=r"proc/kpageflags: missing"):
        kpf.read_flags(0, 8, HostRoot(tmp_path))


def test_a_failing_read_names_file_and_offset(tmp_path: Path) -> None:
    (tmp_path / "proc" / "kpageflags").mkdir(parents=True)  # read() gives EISDIR
    with pytest.raises(KernelFileError, match=r"kpageflags: offset 0x40: Is a directory"):
        kpf.read_flags(8, 8, HostRoot(tmp_path))


def test_a_truncated_entry_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "proc" / "kpageflags"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0" * 12)
    with pytest.raises(KernelFileError, match=r"offset 0xc: read ends inside an entry"):
        kpf.read_flags(0, 4, HostRoot(tmp_path))
