"""Heat across a restart: kept in /run/tierd on stop, taken back once on start."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from tierd.heat import HeatModel
from tierd.service import heat_file

NPFNS = 4096


def model(seed: int | None = None) -> HeatModel:
    heat = HeatModel(NPFNS)
    if seed is not None:
        rng = np.random.default_rng(seed)
        heat.heat[:] = rng.integers(0, 256, NPFNS, dtype=np.uint8)
        heat.mark[:] = rng.integers(0, 256, NPFNS, dtype=np.uint8)
    return heat


def test_a_restart_takes_back_heat_and_marks_and_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "heat"
    before = model(seed=1)
    heat_file.save(before, path)
    assert path.stat().st_mode & 0o777 == 0o600
    after = model()
    assert heat_file.restore(after, path)
    assert np.array_equal(after.heat, before.heat) and np.array_equal(after.mark, before.mark)
    assert not path.exists()
    assert not heat_file.restore(model(), path)  # read once only


def reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> str:
    """Restore what is at tmp_path/heat into a fresh model: it must stay empty, and the
    file must be gone; returns the logged reason."""
    path = tmp_path / "heat"
    fresh = model()
    with caplog.at_level(logging.WARNING):
        assert not heat_file.restore(fresh, path)
    assert not fresh.heat.any() and not fresh.mark.any()
    assert not os.path.lexists(path)
    message = caplog.records[-1].getMessage()
    assert message.startswith(f"{path}: heat from the last run not used")
    return message


def test_heat_older_than_the_limit_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    heat_file.save(model(seed=2), tmp_path / "heat")
    later = heat_file._now() + heat_file.MAX_AGE_SECONDS + 1
    monkeypatch.setattr(heat_file, "_now", lambda: later)
    assert "s ago, more than 600 s" in reason(tmp_path, caplog)


def test_heat_of_another_host_size_is_not_used(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    other = HeatModel(NPFNS * 2)
    heat_file.save(other, tmp_path / "heat")
    assert "expected for this host's memory" in reason(tmp_path, caplog)


def test_a_file_of_the_right_size_but_not_tierds_is_not_used(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "heat"
    path.write_bytes(b"\0" * (heat_file.HEADER.size + 2 * NPFNS))
    path.chmod(0o600)
    assert "not a tierd heat file" in reason(tmp_path, caplog)


def test_a_symlink_is_refused_and_its_target_left_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "target"
    heat_file.save(model(seed=3), target)
    content = target.read_bytes()
    (tmp_path / "heat").symlink_to(target)
    reason(tmp_path, caplog)
    assert target.read_bytes() == content


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_file_another_user_could_write_is_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "heat"
    heat_file.save(model(seed=4), path)
    path.chmod(0o666)
    assert "mode 0o666: not written by this tierd" in reason(tmp_path, caplog)
    heat_file.save(model(seed=4), path)
    os.chown(path, 65534, 65534)
    assert "owner uid 65534" in reason(tmp_path, caplog)


def test_a_truncated_file_leaves_the_model_empty(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "heat"
    heat_file.save(model(seed=5), path)
    with path.open("r+b") as f:
        f.truncate(heat_file.HEADER.size + NPFNS)
    assert "bytes," in reason(tmp_path, caplog)


def test_a_save_that_cannot_write_is_logged_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "missing" / "heat"
    with caplog.at_level(logging.WARNING):
        heat_file.save(model(seed=6), path)
    assert "heat not kept for the next start" in caplog.text
    assert not path.parent.exists()
