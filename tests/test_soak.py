"""The movers' soak (tests/lab/soak.py): round trips of 256 MiB under concurrent writers.

`make test` runs a short soak (two round trips per mover and THP setting);
`make soak` runs 1000 of each (soak.py --all through tests/lab/vm.py run), whose
figures are in docs/benchmarks.md. The phys mover needs the tierd kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).parent / "lab" / "soak.py"
ROUND_TRIPS = 2


def _soak(mover: str, thp: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, str(SOAK), "--mover", mover, "--thp", thp,
                           "--round-trips", str(ROUND_TRIPS), "--size", "256M"],
                          capture_output=True, text=True, timeout=60 + ROUND_TRIPS * 600)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(lines) == 2, done.stdout + done.stderr
    victim, figures = lines
    print(json.dumps({**figures, **victim}))  # the figures, for docs/benchmarks.md
    assert victim["pages_changed"] == 0
    assert victim["writes"] > 0 and victim["forks"] > 0
    return figures


@pytest.mark.vm
@pytest.mark.parametrize("thp", ["off", "on"])
def test_pid_mover_round_trips_change_no_byte(lab_kernel: str, thp: str) -> None:
    figures = _soak("pid", thp)
    assert figures["victim_alive"] and figures["pages_moved"]


@pytest.mark.vm(kernels=["tierd"])
@pytest.mark.parametrize("thp", ["off", "on"])
def test_phys_mover_round_trips_change_no_byte(lab_kernel: str, thp: str) -> None:
    figures = _soak("phys", thp)
    assert figures["victim_alive"] and figures["pages_moved"]
