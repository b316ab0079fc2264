"""The status page (`/` on the metrics port) in headless Chromium, and `tierd status`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_fixture import DEMOTED_PAGES, HEAT_BINS, PROMOTED_PAGES, failed_reload, populated_state

from tierd.config import ReloadStatus
from tierd.service import status_page
from tierd.service.metrics import MetricsServer
from tierd.telemetry import DaemonState

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    srv = MetricsServer(populated_state(), failed_reload, lambda: 5.0, port=0).start()
    yield srv
    srv.stop()


def dump_dom(url: str, profile: Path) -> str:
    """The DOM after Chromium loaded and rendered the page."""
    result = subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_page_in_chromium(server: MetricsServer, tmp_path: Path) -> None:
    dom = dump_dom(server.url + "/", tmp_path / "profile")
    assert "<title>tierd" in dom
    nodes = re.search(r"<table id=\"nodes\">(.*?)</table>", dom, re.S)
    assert nodes, dom[:2000]
    assert re.search(r"<td>node 0</td><td>4</td><td>2\.0 GiB</td><td>1\.5 GiB</td>", nodes[1])
    assert re.search(r"<td>node 1</td><td>54</td><td>2\.0 GiB</td><td>512\.0 MiB</td>", nodes[1])
    for node in (0, 1):
        svg = re.search(rf"<svg id=\"heat-node{node}\".*?</svg>", dom, re.S)
        assert svg and svg[0].count("<rect") == HEAT_BINS
    moves = re.search(r"<table id=\"moves\">(.*?)</table>", dom, re.S)
    assert moves and f"<td>promoted</td><td>{PROMOTED_PAGES}</td>" in moves[1]
    assert f"<td>demoted</td><td>{DEMOTED_PAGES}</td>" in moves[1]
    assert "EBUSY 20" in dom
    assert "LAST RELOAD FAILED" in dom and "interval: must be &gt;= 0.1" in dom
    assert "no IBS or PEBS on this CPU" in dom
    assert "a process exited during the move" in dom


def test_page_holds_no_addresses(server: MetricsServer) -> None:
    page = status_page.StatusReport(populated_state(), failed_reload, lambda: 5.0).html()
    assert not re.search(r"0x[0-9a-fA-F]{4,}|\bpfn\b", page, re.I)


def test_hottest_bin_is_red_and_cold_bins_blue() -> None:
    svg = status_page.heat_svg(1, [0.0, 9.0], peak=9.0)
    fills = re.findall(r"fill='hsl\((\d+),", svg)
    assert fills == ["220", "0"]


def test_markup_in_messages_is_escaped() -> None:
    state = DaemonState()
    state.record_error("collector:perf", "<script>alert(1)</script>")
    report = status_page.StatusReport(state, lambda: ReloadStatus(True, 0.0, None), lambda: 5.0)
    page = report.html()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_tierd_status_prints_the_daemon_state(server: MetricsServer) -> None:
    result = subprocess.run([sys.executable, "-m", "tierd", "status", "--url", server.url],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # node, tier, total, used, free, used share, then hot and cold memory on the node
    assert re.search(r"^\s+0\s+4\s+2\.0 GiB\s+1\.5 GiB\s+512\.0 MiB\s+75\.0%"
                     r"\s+600\.0 MiB\s+128\.0 MiB$", out, re.M), out
    assert re.search(r"^\s+1\s+54\s+2\.0 GiB\s+512\.0 MiB\s+1\.5 GiB\s+25\.0%"
                     r"\s+24\.0 MiB\s+256\.0 MiB$", out, re.M), out
    assert f"promoted: {PROMOTED_PAGES} pages" in out
    assert "failures: EBUSY 20, ENOENT 5" in out
    assert "config: LAST RELOAD FAILED" in out
    assert "perf disabled (no IBS or PEBS on this CPU)" in out
    assert "mover:pid: a process exited during the move" in out


def test_tierd_status_json(server: MetricsServer) -> None:
    result = subprocess.run([sys.executable, "-m", "tierd", "status", "--url", server.url,
                             "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    doc = json.loads(result.stdout)
    assert [n["node"] for n in doc["nodes"]] == [0, 1]
    assert len(doc["nodes"][0]["heat"]) == HEAT_BINS
    assert doc["moves"]["promoted"]["pages"] == PROMOTED_PAGES


def test_tierd_status_reads_the_address_from_the_config(server: MetricsServer,
                                                        tmp_path: Path) -> None:
    cfg = tmp_path / "tierd.yaml"
    cfg.write_text(f"metrics: {{port: {server.port}}}\n")
    result = subprocess.run([sys.executable, "-m", "tierd", "status", "--config", str(cfg)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "promoted:" in result.stdout


def test_tierd_status_without_a_daemon_exits_3(server: MetricsServer) -> None:
    url = server.url
    server.stop()
    result = subprocess.run([sys.executable, "-m", "tierd", "status", "--url", url],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 3
    assert f"cannot reach tierd at {url}" in result.stderr
    assert "Traceback" not in result.stderr
