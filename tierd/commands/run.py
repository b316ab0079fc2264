"""Run the tiering daemon: collect, decide and move pages every interval.

SIGTERM or SIGINT stops it after the batch or scan chunk in flight; SIGHUP
reloads the config file between intervals (a bad file is reported and the
running config kept); SIGUSR1 and SIGUSR2 are logged and ignored. On exit it
prints one summary line of what it moved.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

from tierd.commands.check_config import EX_CONFIG
from tierd.config import DEFAULT_PATH, Config, ConfigError, ConfigStore, ReloadStatus
from tierd.daemon import Daemon, IntervalSummary, describe
from tierd.errors import HostMismatch, Interrupted
from tierd.kernel import capabilities
from tierd.service.metrics import MetricsServer
from tierd.service.signals import IGNORED, RELOAD, STOP, Signals
from tierd.service.systemd import Notifier, log_to_journal
from tierd.telemetry import MoveKey, StateSnapshot
from tierd.vocabulary import PAGE_SIZE, Direction

log = logging.getLogger("tierd.run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help=f"YAML config (default {DEFAULT_PATH} if it exists, else defaults)")
    parser.add_argument("--once", action="store_true", help="run a single interval and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="decide and count what would move; move nothing")
    parser.add_argument("--record", type=Path, metavar="FILE",
                        help="write the evidence trace to FILE (for `tierd simulate`)")


def _load(path: Path | None) -> tuple[ConfigStore | None, Config]:
    if path is None and not DEFAULT_PATH.exists():
        return None, Config()
    store = ConfigStore(path or DEFAULT_PATH)
    return store, store.config


def summary_line(snap: StateSnapshot) -> str:
    """'tierd: 12 intervals, promoted 65536 pages (256.0 MiB), demoted ..., not moved ...'."""
    def total(direction: Direction, counts: Counter[MoveKey]) -> int:
        return sum(v for (d, _, _), v in counts.items() if d is direction)

    counts = snap.pages_would_move if snap.dry_run else snap.pages_moved
    verb = "would have " if snap.dry_run else ""
    mib = snap.page_size / (1 << 20)
    promoted, demoted = total(Direction.PROMOTE, counts), total(Direction.DEMOTE, counts)
    line = (f"tierd: {snap.intervals} intervals, mover {snap.mover}, {verb}promoted "
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


def run(args: argparse.Namespace) -> int:
    # systemd: READY=1, STATUS=, RELOADING=1, WATCHDOG=1 (no-ops outside a service).
    notifier = Notifier()
    log_to_journal()
    try:
        store, config = _load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return EX_CONFIG  # systemd's RestartPreventExitStatus=78: no restart loop
    daemon = Daemon(config, dry_run=args.dry_run, record=args.record)
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

    signals.install()
    daemon.heartbeat = notifier.keepalive
    server = None
    try:
        try:
            daemon.start()
        except HostMismatch as e:
            print(f"tierd: {e}", file=sys.stderr)
            return EX_CONFIG  # as for a bad file: restarting cannot fix it
        except Interrupted:
            handle_signals()
            return 0
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
        daemon.close()
        if server is not None:
            server.stop()
    print(summary_line(daemon.state.snapshot()), file=sys.stdout, flush=True)
    return 0
