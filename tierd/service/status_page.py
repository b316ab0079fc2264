"""The daemon at a glance: one status document, rendered as text (`tierd status`) and HTML (`/`).

The document is plain JSON built from a state snapshot: per-node usage and
tier, moves with their average rates, failures, collectors, the config's
reload status, the last errors and each node's heat strip. Heat strips are
drawn by position across the node's PFN range, never labelled with
addresses (the page is as public as the metrics port).
"""

from __future__ import annotations

import html
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from tierd import __version__
from tierd.config import ReloadStatus
from tierd.errors import TierdError
from tierd.telemetry import DaemonState, StateSnapshot
from tierd.units import plural
from tierd.vocabulary import Direction

Document = dict[str, Any]

# /healthz fails when no interval completed for this many periods: one slow
# interval (a paced idle scan on a large host) passes, a hung main loop does not.
STALE_INTERVALS = 5


class StatusReport:
    """Builds the status document from live state at request time."""

    def __init__(self, state: DaemonState, reload_status: Callable[[], ReloadStatus],
                 interval: Callable[[], float]) -> None:
        self._state = state
        self._reload_status = reload_status
        self._interval = interval
        self._since = time.time()

    def document(self) -> Document:
        return build_document(self._state.snapshot(), self._reload_status(), self._interval(),
                              time.time())

    def json(self) -> bytes:
        return json.dumps(self.document(), indent=1).encode()

    def html(self) -> str:
        return render_html(self.document())

    def liveness(self) -> tuple[bool, str]:
        return liveness(self._state.snapshot(), self._interval(), time.time(), self._since)


def liveness(snap: StateSnapshot, interval: float, now: float, since: float) -> tuple[bool, str]:
    """(alive, why): has the main loop completed an interval lately (since: serving began)?"""
    last = snap.last_interval_at if snap.last_interval_at is not None else since
    age, limit = now - last, STALE_INTERVALS * interval
    what = "last interval" if snap.last_interval_at is not None else "no interval yet, started"
    if age > limit:
        return False, f"stale: {what} {age:.1f} s ago, over {STALE_INTERVALS} intervals" \
                      f" ({limit:g} s)"
    return True, f"ok: {what} {age:.1f} s ago"


def build_document(snap: StateSnapshot, reload: ReloadStatus, interval: float,
                   now: float) -> Document:
    uptime = max(now - snap.started_at, 1e-9)
    return {
        "version": __version__,
        "uptime_seconds": round(uptime, 3),
        "dry_run": snap.dry_run,
        "mover": snap.mover,
        "kernel_tiering": snap.kernel_tiering,
        "interval_seconds": interval,
        "intervals": snap.intervals,
        "failing": snap.failing,
        "last_interval_age_seconds": (None if snap.last_interval_at is None
                                      else round(now - snap.last_interval_at, 3)),
        "config": {"last_reload_successful": reload.successful,
                   "last_reload_success_timestamp": reload.success_timestamp,
                   "error": reload.error},
        "nodes": [_node(snap, node) for node in sorted(snap.nodes)],
        "moves": _moves(snap, uptime),
        "failures": dict(sorted(snap.failures.items())),
        "samples": {"taken": snap.samples_taken, "lost": snap.samples_lost,
                    "unresolved": snap.samples_unresolved},
        "rate_limit_hits": snap.rate_limit_hits,
        "collectors": [{"name": name, "health": str(c.state), "reason": c.reason,
                        "last_ok": c.last_ok} for name, c in sorted(snap.collectors.items())],
        "last_errors": [{"at": e.at, "source": e.source, "message": e.message}
                        for e in reversed(snap.last_errors)],
    }


def _node(snap: StateSnapshot, node: int) -> Document:
    usage = snap.nodes[node]
    return {"node": node, "tier": usage.tier, "tier_rank": usage.tier_rank,
            "total_bytes": usage.total_bytes, "free_bytes": usage.free_bytes,
            "used_bytes": usage.total_bytes - usage.free_bytes,
            "keep_free_bytes": usage.keep_free_bytes, "hot_bytes": usage.hot_bytes,
            "warm_bytes": usage.warm_bytes, "cold_bytes": usage.cold_bytes,
            "heat": list(snap.heat_strips.get(node, ()))}


def _moves(snap: StateSnapshot, uptime: float) -> Document:
    out: Document = {}
    for direction, verb in ((Direction.PROMOTE, "promoted"), (Direction.DEMOTE, "demoted")):
        pages = sum(n for (d, _, _), n in snap.pages_moved.items() if d == direction)
        moved = sum(n for (d, _, _), n in snap.bytes_moved.items() if d == direction)
        out[verb] = {"pages": pages, "bytes": moved,
                     "bytes_per_second": round(moved / uptime, 1),
                     "would_move_pages": sum(n for (d, _, _), n in snap.pages_would_move.items()
                                             if d == direction)}
    return out


# --- text -------------------------------------------------------------------------


def size(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render_text(doc: Document) -> str:
    lines = [
        f"tierd {doc['version']}, up {_duration(doc['uptime_seconds'])},"
        f" {plural(doc['intervals'], 'interval')} of {doc['interval_seconds']:g} s"
        f"{', DRY RUN' if doc['dry_run'] else ''}",
        f"mover: {doc['mover']}   kernel tiering: {doc['kernel_tiering']}   "
        f"last interval: {_age(doc['last_interval_age_seconds'])}",
        _config_line(doc["config"]),
        *([f"LAST INTERVAL FAILED: {doc['failing']}"] if doc.get("failing") else []),
        "",
        f"{'node':>4} {'tier':>4} {'total':>11} {'used':>11} {'free':>11}  used "
        f"{'hot':>11} {'cold':>11}",
    ]
    for n in doc["nodes"]:
        share = n["used_bytes"] / n["total_bytes"] if n["total_bytes"] else 0.0
        lines.append(f"{n['node']:>4} {n['tier']:>4} {size(n['total_bytes']):>11}"
                     f" {size(n['used_bytes']):>11} {size(n['free_bytes']):>11}  {share:5.1%}"
                     f" {size(n['hot_bytes']):>11} {size(n['cold_bytes']):>11}")
    lines.append("")
    for verb, m in doc["moves"].items():
        extra = f", would move {m['would_move_pages']} pages" if doc["dry_run"] else ""
        lines.append(f"{verb}: {m['pages']} pages, {size(m['bytes'])}"
                     f" ({size(m['bytes_per_second'])}/s average){extra}")
    failures = ", ".join(f"{k} {v}" for k, v in doc["failures"].items()) or "none"
    lines.append(f"failures: {failures}   rate-limit hits: {doc['rate_limit_hits']}")
    s = doc["samples"]
    lines.append(f"samples: {s['taken']} taken, {s['lost']} lost, {s['unresolved']} unresolved")
    lines.append("collectors: " + (", ".join(
        f"{c['name']} {c['health']}" + (f" ({c['reason']})" if c["reason"] else "")
        for c in doc["collectors"]) or "none"))
    if doc["last_errors"]:
        lines += ["", "last errors:"]
        lines += [f"  {_clock(e['at'])} {e['source']}: {e['message']}"
                  for e in doc["last_errors"]]
    return "\n".join(lines) + "\n"


def _config_line(config: Document) -> str:
    when = _clock(config["last_reload_success_timestamp"])
    if config["last_reload_successful"]:
        return f"config: loaded {when}"
    return f"config: LAST RELOAD FAILED (running the config loaded {when}): {config['error']}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s ago"


def _clock(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def fetch(url: str, timeout: float = 5.0) -> Document:
    """The running daemon's status document from its metrics port.

    Whatever answers there is untrusted: the reply is size-limited, must be a
    tierd status document, and its strings lose control characters (a terminal
    escape in a reason would otherwise reach the user's terminal).
    """
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/status.json", timeout=timeout) as r:
            body = r.read(MAX_DOCUMENT_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TierdError(f"cannot reach tierd at {_printable(url)}: {_printable(str(reason))}"
                         " (is tierd running? A reload that changed metrics.* applies only after a"
                         " restart)") from None
    if len(body) > MAX_DOCUMENT_BYTES:
        raise TierdError(f"{_printable(url)}/status.json: over {MAX_DOCUMENT_BYTES} bytes:"
                         " not tierd")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise TierdError(f"{_printable(url)}/status.json: not a status document:"
                         f" {_printable(str(e))}") from None
    if not isinstance(doc, dict) or not doc.keys() >= _REQUIRED:
        raise TierdError(f"{_printable(url)}/status.json: not a tierd status document"
                         " (is this tierd's metrics port?)")
    cleaned: Document = _clean(doc)
    return cleaned


MAX_DOCUMENT_BYTES = 16 << 20
_REQUIRED = {"version", "uptime_seconds", "intervals", "nodes", "moves", "collectors",
             "last_errors", "config"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    return _CONTROL.sub("?", text)


def _clean(value: Any) -> Any:
    """The document with control characters in every string replaced by '?'."""
    if isinstance(value, str):
        return _printable(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


# --- HTML ---------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{padding:.2em .8em;text-align:right;border-bottom:1px solid #ddd}
th:first-child,td:first-child{text-align:left}
.bad{color:#b00;font-weight:bold} .ok{color:#070} .off{color:#777}
.bar{display:inline-block;height:.8em;background:#4a7bd0}
svg{display:block;margin:.2em 0 1em}
"""


def render_html(doc: Document) -> str:
    e = html.escape
    title = f"tierd {e(doc['version'])}"
    parts = [
        "<!DOCTYPE html>",
        f"<html lang='en'><head><meta charset='utf-8'><title>{title}</title>",
        f"<meta http-equiv='refresh' content='{max(5, int(doc['interval_seconds']))}'>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p id='summary'>up {_duration(doc['uptime_seconds'])}, {doc['intervals']} intervals"
        f" of {doc['interval_seconds']:g} s; last {_age(doc['last_interval_age_seconds'])};"
        f" mover <b>{e(doc['mover'])}</b>; kernel tiering {e(doc['kernel_tiering'])}"
        + ("; <span class='bad'>DRY RUN</span>" if doc["dry_run"] else "") + "</p>",
        _html_config(doc["config"]),
        "<h2>Nodes</h2>", _html_nodes(doc["nodes"]),
        "<h2>Heat across each node</h2>", _html_heat(doc["nodes"]),
        "<h2>Moves</h2>", _html_moves(doc),
        "<h2>Collectors</h2>", _html_collectors(doc["collectors"]),
        "<h2>Last errors</h2>", _html_errors(doc["last_errors"]),
        "<p><a href='/metrics'>metrics</a> · <a href='/status.json'>status.json</a></p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _html_config(config: Document) -> str:
    text = html.escape(_config_line(config))
    css = "ok" if config["last_reload_successful"] else "bad"
    return f"<p id='config' class='{css}'>{text}</p>"


def _html_nodes(nodes: list[Document]) -> str:
    rows = ["<table id='nodes'><tr><th>node</th><th>tier</th><th>total</th><th>used</th>"
            "<th>free</th><th>used</th></tr>"]
    for n in nodes:
        share = n["used_bytes"] / n["total_bytes"] if n["total_bytes"] else 0.0
        rows.append(f"<tr><td>node {n['node']}</td><td>{n['tier']}</td>"
                    f"<td>{size(n['total_bytes'])}</td><td>{size(n['used_bytes'])}</td>"
                    f"<td>{size(n['free_bytes'])}</td><td><span class='bar'"
                    f" style='width:{share * 8:.2f}em'></span> {share:.1%}</td></tr>")
    return "\n".join(rows) + "</table>"


def _html_heat(nodes: list[Document]) -> str:
    peak = max((h for n in nodes for h in n["heat"]), default=0.0)
    out = [f"<p>Colour: mean heat per slice, from cold (blue) to the hottest slice (red,"
           f" heat {peak:.3g}). Left is the node's lowest page, right its highest.</p>"]
    for n in nodes:
        out.append(f"<h3>node {n['node']} (tier {n['tier']})</h3>")
        out.append(heat_svg(n["node"], n["heat"], peak))
    return "\n".join(out)


def heat_svg(node: int, heat: list[float], peak: float, width: int = 800,
             height: int = 28) -> str:
    """One rect per bin, coloured by sqrt(heat / peak) so warm pages stay visible."""
    if not heat:
        return f"<p id='heat-node{node}'>no heat yet</p>"
    step = width / len(heat)
    rects = []
    for i, h in enumerate(heat):
        level = math.sqrt(h / peak) if peak > 0 else 0.0
        hue = round(220 * (1 - level))
        start, end = 100 * i / len(heat), 100 * (i + 1) / len(heat)
        rects.append(f"<rect x='{i * step:.2f}' width='{step + 0.5:.2f}' height='{height}'"
                     f" fill='hsl({hue},75%,{45 + 10 * (1 - level):.0f}%)'><title>"
                     f"{start:.0f}-{end:.0f}% of node {node}: heat {h:.3g}</title></rect>")
    return (f"<svg id='heat-node{node}' class='heat' xmlns='http://www.w3.org/2000/svg'"
            f" width='{width}' height='{height}' viewBox='0 0 {width} {height}'"
            f" role='img' aria-label='heat across node {node}'>" + "".join(rects) + "</svg>")


def _html_moves(doc: Document) -> str:
    rows = ["<table id='moves'><tr><th></th><th>pages</th><th>bytes</th><th>average rate</th>"
            + ("<th>would move</th>" if doc["dry_run"] else "") + "</tr>"]
    for verb, m in doc["moves"].items():
        rows.append(f"<tr><td>{verb}</td><td>{m['pages']}</td><td>{size(m['bytes'])}</td>"
                    f"<td>{size(m['bytes_per_second'])}/s</td>"
                    + (f"<td>{m['would_move_pages']}</td>" if doc["dry_run"] else "") + "</tr>")
    rows.append("</table>")
    failures = ", ".join(f"{html.escape(k)} {v}" for k, v in doc["failures"].items())
    s = doc["samples"]
    rows.append(f"<p id='failures'>failures: {failures or 'none'}; rate-limit hits:"
                f" {doc['rate_limit_hits']}; samples: {s['taken']} taken, {s['lost']} lost,"
                f" {s['unresolved']} unresolved</p>")
    return "\n".join(rows)


def _html_collectors(collectors: list[Document]) -> str:
    rows = ["<table id='collectors'><tr><th>collector</th><th>health</th><th>reason</th>"
            "<th>last evidence</th></tr>"]
    for c in collectors:
        css = {"ok": "ok", "disabled": "off"}.get(c["health"], "bad")
        last = _clock(c["last_ok"]) if c["last_ok"] else "never"
        rows.append(f"<tr><td>{html.escape(c['name'])}</td><td class='{css}'>{c['health']}"
                    f"</td><td>{html.escape(c['reason'])}</td><td>{last}</td></tr>")
    return "\n".join(rows) + "</table>"


def _html_errors(errors: list[Document]) -> str:
    if not errors:
        return "<p id='errors'>none</p>"
    items = "".join(f"<li>{_clock(err['at'])} <b>{html.escape(err['source'])}</b>:"
                    f" {html.escape(err['message'])}</li>" for err in errors)
    return f"<ul id='errors'>{items}</ul>"
