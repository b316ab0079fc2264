"""Heat across a restart: `tierd run` leaves its heat model in /run/tierd/heat when it
stops, and the next start in the same boot takes it back.

Without it every restart (an upgrade, `systemctl restart`) starts each page from
nothing, and on a large host, where one round of idle evidence takes minutes,
pages wait rounds again before they move. The file holds the heat and mark of
every PFN (two bytes a PFN, as in memory). It is good only for the boot that
wrote it (/run is emptied at boot) and for MAX_AGE_SECONDS: after longer, the
pages behind the PFNs have changed too much. A start removes it as it opens it,
so the tmpfs memory it takes is held only while tierd is down, and a bad file is
never read twice. Anything wrong with it is logged, naming the file and the
reason, and tierd starts from nothing as before. No message names a PFN count:
the highest PFN is where physical memory ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import struct
import time
from io import BufferedReader
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tierd.heat import HeatModel

log = logging.getLogger(__name__)

MAGIC = b"TIERDHT1"
HEADER = struct.Struct("<8sQd")  # magic, PFNs, CLOCK_BOOTTIME seconds when written
# A restart takes seconds; after ten minutes the saved heat says little about now.
MAX_AGE_SECONDS = 600.0
NAME = "heat"


class HeatFileError(Exception):
    """The heat file is not one this tierd may use."""


def _now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def save(model: HeatModel, path: Path) -> None:
    """Write the model to `path` (0600, by rename); a failure is logged, never raised."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(HEADER.pack(MAGIC, model.npfns, _now()))
            f.write(model.heat.data)
            f.write(model.mark.data)
        os.replace(temporary, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            temporary.unlink()
        log.warning("%s: heat not kept for the next start: %s", path, e.strerror or e)
        return
    log.info("heat kept in %s for the next start", path)


def restore(model: HeatModel, path: Path) -> bool:
    """Take the heat a previous tierd left at `path` into `model`; False when there is
    none or it cannot be used (logged). The file is gone afterwards either way."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as e:
        _discard(path)
        log.warning("%s: heat from the last run not used: %s", path, e.strerror or e)
        return False
    with os.fdopen(fd, "rb") as f:
        path.unlink()
        model.version += 1
        try:
            age = _check(os.fstat(f.fileno()), f.read(HEADER.size), model.npfns)
            _read_exactly(f, model.heat)
            _read_exactly(f, model.mark)
        except (HeatFileError, OSError) as e:
            model.heat[:] = 0
            model.mark[:] = 0
            log.warning("%s: heat from the last run not used: %s", path, e)
            return False
    log.info("heat taken from the last run (%.0f s ago)", age)
    return True


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _check(info: os.stat_result, header: bytes, npfns: int) -> float:
    """The file's age in seconds, or HeatFileError saying why it cannot be used."""
    if not stat.S_ISREG(info.st_mode):
        raise HeatFileError("not a regular file")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise HeatFileError(f"owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):#o}:"
                            " not written by this tierd (0600, its own uid)")
    expected = HEADER.size + 2 * npfns
    if info.st_size != expected:
        raise HeatFileError(f"{info.st_size} bytes, {expected} expected for this host's"
                            " memory")
    magic, saved_pfns, saved_at = HEADER.unpack(header)
    age = _now() - float(saved_at)
    if magic != MAGIC or saved_pfns != npfns:
        raise HeatFileError("not a tierd heat file")
    if not 0 <= age <= MAX_AGE_SECONDS:
        raise HeatFileError(f"written {age:.0f} s ago, more than {MAX_AGE_SECONDS:.0f} s")
    return age


def _read_exactly(f: BufferedReader, array: npt.NDArray[np.uint8]) -> None:
    """Fill `array` from `f` in place: no PFN-sized temporary."""
    view = array.data
    done = 0
    while done < view.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise HeatFileError("shorter than its header says")
        done += n
