"""Prometheus metrics: a custom collector that reads the daemon state at scrape time.

Nothing is counted here: every value comes from one `DaemonState.snapshot()`
(and the config store's reload status) taken when Prometheus scrapes, so a
scrape sees one consistent interval. Names follow the Prometheus conventions
(tierd_ prefix, base units, `_total` counters); labels are node numbers,
tiers, directions, stages, collectors and failure reasons, all bounded sets,
never a pid or an address. docs/metrics.md lists every family.

`MetricsServer` serves `/metrics`, the status page `/`, `/status.json` and
`/healthz` (503 once the main loop is stale) on one port, bound to 127.0.0.1
unless the config says otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import ipaddress
import logging
import platform
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tierd import __version__
from tierd.build import revision
from tierd.config import ReloadStatus
from tierd.errors import TierdError
from tierd.kernel import capabilities
from tierd.service import status_page
from tierd.telemetry import DURATION_BUCKETS, DaemonState, StateSnapshot
from tierd.vocabulary import State

MOVE_LABELS = ["source_node", "target_node"]
log = logging.getLogger(__name__)


class TierdCollector(Collector):
    """Every tierd_* family, built from one state snapshot per scrape."""

    def __init__(self, state: DaemonState, reload_status: Callable[[], ReloadStatus],
                 interval: Callable[[], float]) -> None:
        self._state = state
        self._reload_status = reload_status
        self._interval = interval

    def collect(self) -> Iterator[Metric]:
        snap = self._state.snapshot()
        yield from _daemon(snap, self._interval())
        yield from _memory(snap)
        yield from _moves(snap)
        yield from _samples(snap)
        yield from _durations(snap)
        yield from _collectors(snap)
        yield _labelled(CounterMetricFamily(
            "tierd_errors", "Errors the daemon recorded, by where they arose.",
            labels=["source"]), snap.errors)
        yield from _reload(self._reload_status())


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _daemon(snap: StateSnapshot, interval: float) -> Iterator[Metric]:
    info = GaugeMetricFamily("tierd_build_info",
                             "tierd's version and source revision; always 1.",
                             labels=["version", "revision", "pythonversion"])
    info.add_metric([__version__, revision(), platform.python_version()], 1)
    yield info
    yield _gauge("tierd_start_time_seconds", "When the daemon started (Unix time).",
                 snap.started_at)
    yield _gauge("tierd_dry_run", "1 when tierd decides but never moves pages.",
                 float(snap.dry_run))
    mover = GaugeMetricFamily("tierd_mover_info", "The mover in use; always 1.",
                              labels=["mover"])
    mover.add_metric([snap.mover], 1)
    yield mover
    stance = GaugeMetricFamily("tierd_kernel_tiering_info",
                               "What the kernel's own tiering is doing; always 1.",
                               labels=["state"])
    stance.add_metric([snap.kernel_tiering], 1)
    yield stance
    yield _gauge("tierd_interval_seconds", "Configured period of the main loop.", interval)
    yield _counter("tierd_intervals", "Main-loop intervals completed.", snap.intervals)
    if snap.last_interval_at is not None:
        yield _gauge("tierd_last_interval_timestamp_seconds",
                     "When the last interval completed (Unix time).", snap.last_interval_at)
    yield _gauge("tierd_tracked_pages", "Pages with heat.", snap.tracked_pages)
    yield _gauge("tierd_rmap_entries", "Entries in the reverse-map cache.", snap.rmap_pages)
    yield _gauge("tierd_rmap_bytes", "Memory held by the reverse-map cache.", snap.rmap_bytes)


def _memory(snap: StateSnapshot) -> Iterator[Metric]:
    kinds = ("total", "free", "used", "keep_free")
    per_node = {k: GaugeMetricFamily(f"tierd_node_memory_{k}_bytes", doc,
                                     labels=["node", "tier"]) for k, doc in _MEMORY_DOCS.items()}
    per_tier = {k: GaugeMetricFamily(f"tierd_tier_memory_{k}_bytes",
                                     doc.replace("a NUMA node", "a memory tier (all its nodes)"),
                                     labels=["tier"]) for k, doc in _MEMORY_DOCS.items()}
    rank = GaugeMetricFamily("tierd_node_tier_rank",
                             "Place of the node's memory tier, fastest first: 0 is the top tier.",
                             labels=["node", "tier"])
    placement = GaugeMetricFamily("tierd_placement_bytes",
                                  "Tracked memory on a node by heat class (hot, warm, cold).",
                                  labels=["node", "tier", "heat"])
    tiers: dict[int, Counter[str]] = {}
    for usage in sorted(snap.nodes.values(), key=lambda u: u.node):
        labels = [str(usage.node), str(usage.tier)]
        values = {"total": usage.total_bytes, "free": usage.free_bytes,
                  "used": usage.total_bytes - usage.free_bytes,
                  "keep_free": usage.keep_free_bytes}
        for kind, value in values.items():
            per_node[kind].add_metric(labels, value)
        tiers.setdefault(usage.tier, Counter()).update(values)
        rank.add_metric(labels, usage.tier_rank)
        for heat, held in (("hot", usage.hot_bytes), ("warm", usage.warm_bytes),
                           ("cold", usage.cold_bytes)):
            placement.add_metric([*labels, heat], held)
    for tier, values in sorted(tiers.items()):
        for kind in kinds:
            per_tier[kind].add_metric([str(tier)], values[kind])
    yield from per_node.values()
    yield from per_tier.values()
    yield rank
    yield placement


_MEMORY_DOCS = {
    "total": "Total memory of a NUMA node.",
    "free": "Free memory of a NUMA node.",
    "used": "Used memory of a NUMA node.",
    "keep_free": "Memory the policy keeps free on a NUMA node (watermark + headroom).",
}


def _moves(snap: StateSnapshot) -> Iterator[Metric]:
    moved = CounterMetricFamily("tierd_moved_pages", "Pages that reached their target node.",
                                labels=["direction", *MOVE_LABELS])
    moved_bytes = CounterMetricFamily("tierd_moved_bytes", "Bytes that reached their target node.",
                                      labels=["direction", *MOVE_LABELS])
    would = CounterMetricFamily("tierd_dry_run_pages",
                                "Pages a dry run decided to move, each once per target node.",
                                labels=["direction", *MOVE_LABELS])
    attempts = CounterMetricFamily("tierd_migration_attempts",
                                   "Pages handed to a mover, moved or not.",
                                   labels=["direction", *MOVE_LABELS])
    for family, counts in ((moved, snap.pages_moved), (moved_bytes, snap.bytes_moved),
                           (would, snap.pages_would_move), (attempts, snap.pages_attempted)):
        for (d, source, target), n in sorted(counts.items()):
            family.add_metric([str(d), str(source), str(target)], n)
    yield moved
    yield moved_bytes
    yield would
    yield attempts
    yield _labelled(CounterMetricFamily(
        "tierd_migration_failures", "Pages not moved, by reason (errno name or call failure).",
        labels=["reason"]), snap.failures)
    yield _labelled(CounterMetricFamily(
        "tierd_excluded_pages", "Candidate pages skipped by a safety rule or an exclusion.",
        labels=["reason"]), snap.pages_excluded)
    yield _labelled(CounterMetricFamily(
        "tierd_pingpong_pages", "Pages moved back the other way within the move history's"
        " window (pages the PID mover followed to their new frame).",
        labels=["direction"]), snap.pages_pingpong)
    yield _counter("tierd_rate_limit_hits",
                   "Intervals in which the migration budget cut the plan.", snap.rate_limit_hits)
    yield _counter("tierd_rate_limited_pages", "Pages held back by the migration budget.",
                   snap.pages_deferred_by_rate_limit)


def _labelled(family: CounterMetricFamily, counts: Counter[str]) -> CounterMetricFamily:
    for label, n in sorted(counts.items()):
        family.add_metric([label], n)
    return family


def _samples(snap: StateSnapshot) -> Iterator[Metric]:
    yield _counter("tierd_samples", "Memory-access samples resolved to a page.",
                   snap.samples_taken)
    yield _counter("tierd_samples_lost", "Samples the kernel dropped (ring overruns).",
                   snap.samples_lost)
    yield _counter("tierd_samples_unresolved",
                   "Samples whose page could not be found (counted, never guessed).",
                   snap.samples_unresolved)


def _durations(snap: StateSnapshot) -> Iterator[Metric]:
    family = HistogramMetricFamily("tierd_stage_duration_seconds",
                                   "Time each stage of an interval took (collect is the scan).",
                                   labels=["stage"])
    for stage, d in sorted(snap.durations.items()):
        buckets = [(_le(b), float(n)) for b, n in zip(DURATION_BUCKETS, d.bucket_counts,
                                                      strict=True)]
        family.add_metric([stage], [*buckets, ("+Inf", float(d.count))], d.total_seconds)
    yield family
    cpu = CounterMetricFamily("tierd_stage_cpu_seconds",
                              "CPU time (user + system) the daemon spent in each stage.",
                              labels=["stage"])
    for stage, d in sorted(snap.durations.items()):
        cpu.add_metric([stage], d.cpu_seconds)
    yield cpu


def _le(bound: float) -> str:
    return repr(float(bound))


def _collectors(snap: StateSnapshot) -> Iterator[Metric]:
    state = GaugeMetricFamily("tierd_collector_state",
                              "1 for the collector's current health (ok, degraded, disabled).",
                              labels=["collector", "state"])
    last_ok = GaugeMetricFamily("tierd_collector_last_success_timestamp_seconds",
                                "When the collector last delivered evidence (Unix time).",
                                labels=["collector"])
    for name, health in sorted(snap.collectors.items()):
        for s in State:
            state.add_metric([name, str(s)], float(health.state is s))
        if health.last_ok is not None:
            last_ok.add_metric([name], health.last_ok)
    yield state
    yield last_ok


def _reload(reload: ReloadStatus) -> Iterable[Metric]:
    return (
        _gauge("tierd_config_last_reload_successful",
               "1 if the last config load or reload succeeded.", float(reload.successful)),
        _gauge("tierd_config_last_reload_success_timestamp_seconds",
               "When the config was last loaded successfully (Unix time).",
               reload.success_timestamp),
    )


def build_registry(state: DaemonState, reload_status: Callable[[], ReloadStatus],
                   interval: Callable[[], float]) -> CollectorRegistry:
    """tierd's families plus the process_* ones (CPU, memory, fds of the daemon)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TierdCollector(state, reload_status, interval))
    ProcessCollector(registry=registry)
    return registry


# --- the HTTP endpoint ------------------------------------------------------------
#
# The port is open to every local user, so no client may hold the daemon:
# each connection has a deadline, their number is capped, a request is a
# few KiB at most, and only GET and HEAD are answered. Bound to loopback,
# the Host header must name a loopback host, so a web page whose name was
# re-pointed at 127.0.0.1 (DNS rebinding) cannot read the status.

MAX_CONNECTIONS = 16  # Prometheus and a browser or two; more is a client hoarding sockets
REQUEST_SECONDS = 10.0  # to read a request and send the answer, whatever the client does
MAX_REQUEST_BYTES = 8192  # request line and headers together
ACCEPT_BACKOFF_SECONDS = 0.1  # after accept() fails for want of an fd


class _Limited(io.RawIOBase):
    """The request stream, refusing to read past MAX_REQUEST_BYTES."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self._raw = raw
        self._left = MAX_REQUEST_BYTES

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise http.client.LineTooLong(f"request over {MAX_REQUEST_BYTES} bytes")
        view = memoryview(buffer)[:self._left]
        n = self._raw.readinto1(view) if hasattr(self._raw, "readinto1") else \
            self._raw.readinto(view)
        self._left -= n
        return n


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_SECONDS  # per socket operation; the deadline below bounds the total

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_Limited(self.rfile), 1024)
        # A client trickling a byte every few seconds: the deadline ends it.
        self._deadline = threading.Timer(REQUEST_SECONDS, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):  # the client may be gone; nothing to tell it
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the journal."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn): a DNS wait
        # at startup on a host whose resolver is down. The literal will do.
        TCPServer.server_bind(self)
        host, self.server_port = self.server_address[:2]
        self.server_name = str(host)
        self.setup_environ()

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(ACCEPT_BACKOFF_SECONDS)  # the listener stays readable: do not spin
            raise

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Over the cap, close the connection at once rather than queue it."""
        return self._slots.acquire(blocking=False)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could be started: answer nobody, keep serving
            self._slots.release()
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that broke its connection is not the daemon's error."""


class _Server6(_Server):
    address_family = socket.AF_INET6


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _host_check(address: str) -> Callable[[str | None], bool]:
    """Bound to loopback: accept only Host headers naming a loopback host (or none)."""
    if not ipaddress.ip_address(address).is_loopback:
        return lambda _host: True  # reachable from the network anyway: nothing to rebind
    def allowed(host: str | None) -> bool:
        if not host:
            return True  # HTTP/1.0 without Host: no browser sends that
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") \
            else host
        name = name.strip("[]").lower()
        if name == "localhost":
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False
    return allowed


def _plain(start_response: Callable[..., Any], status: str, text: str,
           headers: tuple[tuple[str, str], ...] = ()) -> Iterable[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


def _app(routes: dict[str, WsgiApp], host_allowed: Callable[[str | None], bool]) -> WsgiApp:
    """Dispatch GET and HEAD by path; everything else is refused."""
    names = ", ".join(routes)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "only GET and HEAD\n",
                          (("Allow", "GET, HEAD"),))
        if not host_allowed(environ.get("HTTP_HOST")):
            return _plain(start_response, "421 Misdirected Request",
                          "Host must name this host's loopback address\n")
        route = routes.get(environ.get("PATH_INFO", "/"))
        if route is None:
            return _plain(start_response, "404 Not Found", f"not found: try {names}\n")
        body = route(environ, start_response)
        if method == "HEAD":
            b"".join(body)  # the headers carry the length; the body is not sent
            return []
        return body

    return app


def _health(liveness: Callable[[], tuple[bool, str]]) -> WsgiApp:
    """200 while the main loop completes intervals, 503 (and why) once it stops."""
    def app(_environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        alive, why = liveness()
        return _plain(start_response, "200 OK" if alive else "503 Service Unavailable",
                      f"{why}\n")
    return app


def _page(render: Callable[[], bytes], kind: str) -> WsgiApp:
    def app(_environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = render()
        start_response("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]
    return app


class MetricsServer:
    """/metrics, /, /status.json and /healthz on one port, served from a background thread."""

    def __init__(self, state: DaemonState, reload_status: Callable[[], ReloadStatus],
                 interval: Callable[[], float], address: str = "127.0.0.1",
                 port: int = 9748) -> None:
        self.address = address
        self._registry = build_registry(state, reload_status, interval)
        self._report = status_page.StatusReport(state, reload_status, interval)
        routes = {
            "/": _page(lambda: self._report.html().encode(), "text/html; charset=utf-8"),
            "/metrics": make_wsgi_app(self._registry),
            "/status.json": _page(self._report.json, "application/json"),
            "/healthz": _health(self._report.liveness),
        }
        app = _app(routes, _host_check(address))
        server_class = _Server6 if ":" in address else _Server
        try:
            self._server = make_server(address, port, app, server_class, _Handler)
        except OSError as e:
            raise TierdError(f"metrics: cannot listen on {address} port {port}:"
                             f" {e.strerror or e}") from None
        self._thread = threading.Thread(target=self._serve, name="tierd-metrics", daemon=True)

    def _serve(self) -> None:
        # The parser of whatever any local user sends runs with no capability.
        try:
            capabilities.drop_all()
        except OSError as e:
            log.warning("metrics: could not drop capabilities: %s", e)
        self._server.serve_forever()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, so only if it runs
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
