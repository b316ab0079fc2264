"""Run the tiering daemon: collect, decide and move pages every interval.

SIGTERM or SIGINT stops it after the batch or scan chunk in flight; SIGHUP
reloads the config file between intervals (a bad file is reported and the
running config kept; a changed setting that applies only at start is named);
SIGUSR1 and SIGUSR2 are logged and ignored. Each interval logs a line at
DEBUG; INFO gets the first interval and then a summary every few minutes.
One tierd per host: a second `tierd run` exits 75. On exit it prints one
summary line of what it moved (JSON with --json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tierd.commands.check_config import EX_CONFIG
from tierd.config import DEFAULT_PATH, Config, ConfigError, ConfigStore, ReloadStatus
from tierd.daemon import Daemon, IntervalSummary, describe
from tierd.errors import HostMismatch, Interrupted
from tierd.kernel import capabilities
from tierd.service import heat_file
from tierd.service.lock import AlreadyRunning, InstanceLock, lock_path, run_dir
from tierd.service.metrics import MetricsServer
from tierd.service.signals import IGNORED, RELOAD, STOP, Signals
from tierd.service.systemd import Notifier, log_to_journal
from tierd.telemetry import MoveKey, StateSnapshot
from tierd.units import plural
from tierd.vocabulary import PAGE_SIZE, Direction

log = logging.getLogger("tierd.run")

EX_TEMPFAIL = 75  # sysexits.h: another tierd holds the lock; try again later
# INFO gets one summary line per this many seconds; every interval is at DEBUG.
SUMMARY_SECONDS = 600.0
# Read once at start: a reload that changes one of these (or a key under it)
# is accepted, but the change applies only after a restart.
START_ONLY = ("collectors", "movers.kind", "kernel_tiering", "metrics")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"YAML config (default {DEFAULT_PATH} if it exists, else defaults)")
    parser.add_argument("--once", action="store_true", help="run a single interval and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="decide and count what would move; move nothing")
    parser.add_argument("--record", type=Path, metavar="FILE",
                        help="write the evidence trace to FILE (for `tierd simulate`)")
    parser.add_argument("--json", action="store_true",
                        help="print the exit summary as JSON (with --once: one interval's)")


def _load(path: Path | None) -> tuple[ConfigStore | None, Config]:
    if path is None and not DEFAULT_PATH.exists():
        return None, Config()
    store = ConfigStore(path or DEFAULT_PATH)
    return store, store.config


def _total(direction: Direction, counts: Counter[MoveKey]) -> int:
    return sum(v for (d, _, _), v in counts.items() if d is direction)


def summary_line(snap: StateSnapshot) -> str:
    """'tierd: 12 intervals, promoted 65536 pages (256.0 MiB), demoted ..., not moved ...'."""
    counts = snap.pages_would_move if snap.dry_run else snap.pages_moved
    verb = "would have " if snap.dry_run else ""
    mib = snap.page_size / (1 << 20)
    promoted, demoted = _total(Direction.PROMOTE, counts), _total(Direction.DEMOTE, counts)
    line = (f"tierd: {plural(snap.intervals, 'interval')}, mover {snap.mover}, {verb}promoted "
            f"{promoted} pages ({promoted * mib:.1f} MiB), {verb}demoted {demoted} pages "
            f"({demoted * mib:.1f} MiB)")
    failures = sum(snap.failures.values())
    if failures:
        top = ", ".join(f"{k}={v}" for k, v in snap.failures.most_common(4))
        line += f", {failures} not moved ({top})"
    return line


def _drop_capabilities() -> None:
    """Start-up is done: keep only what the loop uses (tierd.kernel.capabilities)."""
    try:
        capabilities.keep_only()
    except OSError as e:
        log.warning("could not drop capabilities: %s", e)
def summary_document(snap: StateSnapshot) -> dict[str, Any]:
    """summary_line's facts as JSON: counts per direction, bytes, failures by reason."""
    counts = snap.pages_would_move if snap.dry_run else snap.pages_moved
    pages = {str(d): _total(d, counts) for d in Direction}
    return {"intervals": snap.intervals, "mover": snap.mover, "dry_run": snap.dry_run,
            "pages": pages, "bytes": {d: n * snap.page_size for d, n in pages.items()},
            "not_moved": dict(sorted(snap.failures.items()))}


def restart_needed(running: Config, new: Config) -> list[str]:
    """'metrics.port (9748 -> 9800)' for each START_ONLY setting `new` changes."""
    old, cur = _flat(dataclasses.asdict(running)), _flat(dataclasses.asdict(new))
    return [f"{key} ({old[key]} -> {cur[key]})" for key in sorted(old)
            if old[key] != cur[key] and any(key == p or key.startswith(p + ".")
                                             for p in START_ONLY)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class IntervalLog:
    """INFO for the first interval and a summary every SUMMARY_SECONDS; DEBUG for each."""

    def __init__(self, every: float = SUMMARY_SECONDS) -> None:
        self._every = every
        self._first = True
        self._restart()

    def _restart(self) -> None:
        self._since = time.monotonic()
        self._count = 0
        self._tally = IntervalSummary()

    def add(self, number: int, summary: IntervalSummary) -> None:
        log.debug("interval %d: %s", number, describe(summary, PAGE_SIZE))
        if self._first:
            log.info("first interval: %s", describe(summary, PAGE_SIZE))
            self._first = False
        self._count += 1
        self._tally.moved.update(summary.moved)
        self._tally.failures.update(summary.failures)
        self._tally.deferred += summary.deferred
        if time.monotonic() - self._since >= self._every:
            log.info("last %s: %s", plural(self._count, "interval"),
                     describe(self._tally, PAGE_SIZE))
            self._restart()


def run(args: argparse.Namespace) -> int:
    # systemd: READY=1, STATUS=, RELOADING=1, WATCHDOG=1 (no-ops outside a service).
    notifier = Notifier()
    if args.log_format == "text":
        log_to_journal()
    try:
        store, config = _load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EX_CONFIG  # systemd's RestartPreventExitStatus=78: no restart loop
    lock = InstanceLock(lock_path())
    try:
        lock.acquire()
    except AlreadyRunning as e:
        print(f"tierd: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    try:
        return _serve(args, notifier, store, config)
    finally:
        lock.release()


def _serve(args: argparse.Namespace, notifier: Notifier, store: ConfigStore | None,
           config: Config) -> int:
    daemon = Daemon(config, dry_run=args.dry_run, record=args.record)
    interval_log = IntervalLog()
    started = time.time()

    def reload_status() -> ReloadStatus:
        return store.status if store else ReloadStatus(True, started, None)

    def reload() -> None:
        if store is None:
            log.warning("SIGHUP: no config file to reload")
            return
        notifier.reloading()
        if store.reload():
            daemon.reload(store.config)
            for setting in restart_needed(config, store.config):
                log.warning("config reload: %s applies only after a restart"
                            " (systemctl restart tierd)", setting)
            notifier.reloaded(f"config reloaded from {store.path}")
        else:
            log.error("config reload failed, keeping the running config: %s",
                      store.status.error)
            daemon.state.record_error("config", store.status.error or "reload failed")
            notifier.reloaded(f"config reload failed, running the previous one: "
                              f"{store.status.error}")

    signals = Signals(daemon.stop_event)

    def handle_signals() -> None:
        received = signals.take()
        for signum in sorted(received & STOP):
            log.info("%s: stopping after the batch in flight", signum.name)
        for signum in sorted(received & IGNORED):
            log.info("%s ignored: it has no meaning for tierd", signum.name)
        if RELOAD in received and not daemon.stop_event.is_set():
            reload()

    def wait(seconds: float) -> bool:
        """Wait between intervals, feeding the watchdog and acting on signals."""
        deadline = time.monotonic() + seconds
        while True:
            handle_signals()
            left = deadline - time.monotonic()
            if daemon.stop_event.is_set() or left <= 0:
                return daemon.stop_event.is_set()
            notifier.wait(signals.wake, left)

    def on_interval(summary: IntervalSummary) -> None:
        notifier.status(f"interval {daemon.state.intervals}: {describe(summary, PAGE_SIZE)}")
        interval_log.add(daemon.state.intervals, summary)

    signals.install()
    daemon.heartbeat = notifier.keepalive
    server = None
    heat_path = run_dir() / heat_file.NAME
    started = False
    try:
        try:
            daemon.start()
        except HostMismatch as e:
            print(f"tierd: {e}", file=sys.stderr)
            return EX_CONFIG  # as for a bad file: restarting cannot fix it
        except Interrupted:
            handle_signals()
            return 0
        started = True
        heat_file.restore(daemon.heat, heat_path)
        _drop_capabilities()
        if config.metrics.enabled:
            server = MetricsServer(daemon.state, reload_status, lambda: daemon.settings.interval,
                                   config.metrics.address, config.metrics.port).start()
            log.info("metrics on %s/metrics", server.url)
        notifier.ready(f"mover {daemon.state.mover}, "
                       f"{'dry run' if daemon.settings.dry_run else 'moving pages'}, "
                       f"metrics {server.url if server else 'off'}")
        daemon.run(once=args.once, on_interval=on_interval, wait=wait)
        handle_signals()
    finally:
        notifier.stopping()
        if started:
            heat_file.save(daemon.heat, heat_path)
        daemon.close()
        if server is not None:
            server.stop()
    snap = daemon.state.snapshot()
    print(json.dumps(summary_document(snap)) if args.json else summary_line(snap),
          file=sys.stdout, flush=True)
    return 0
