"""Log output: text for a terminal or the journal, JSON or logfmt where no journald runs.

`configure(level, fmt)` sets the root logger once, from `tierd --log-level
--log-format`. Under systemd, `tierd run` with the text format hands the
records to the journal instead (tierd.service.systemd.log_to_journal).
"""

from __future__ import annotations

import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json", "logfmt")
TEXT = "%(levelname)s %(name)s: %(message)s"


def _fields(record: logging.LogRecord) -> dict[str, str]:
    """time (RFC 3339, UTC, ms), level, logger, msg: the keys Kubernetes log tools expect."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    fields = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
              "logger": record.name, "msg": record.getMessage()}
    if record.exc_info:
        fields["error"] = logging.Formatter().formatException(record.exc_info)
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record))


class LogfmtFormatter(logging.Formatter):
    """key=value pairs, values quoted when they hold spaces, quotes or '='."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in _fields(record).items())


def _logfmt_value(value: str) -> str:
    if value and not any(c in value for c in ' "=\n\t'):
        return value
    return json.dumps(value)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "logfmt":
        return LogfmtFormatter()
    return logging.Formatter(TEXT)


def configure(level: str, fmt: str) -> None:
    """Root logger to stderr at `level` (one of LEVELS) in `fmt` (one of FORMATS)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
