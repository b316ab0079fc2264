"""Show the running daemon's state: nodes, tiers, moves, collectors, last errors.

Reads /status.json from the daemon's metrics port (the address and port in
the config file, or --url). Exits 3 when no daemon answers, like
`systemctl status` for a stopped unit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tierd import config
from tierd.errors import TierdError
from tierd.service import status_page

EXIT_NOT_RUNNING = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path,
                        help="config file naming the metrics address"
                             f" (default {config.DEFAULT_PATH} if it exists)")
    parser.add_argument("--url", help="the daemon's metrics URL, e.g. http://127.0.0.1:9748")
    parser.add_argument("--json", action="store_true", help="print the status document as JSON")


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    if args.config is None and not config.DEFAULT_PATH.exists():
        metrics = config.Config().metrics
    else:
        metrics = config.load(args.config or config.DEFAULT_PATH).metrics
    host = f"[{metrics.address}]" if ":" in metrics.address else metrics.address
    return f"http://{host}:{metrics.port}"


def run(args: argparse.Namespace) -> int:
    url = _url(args)
    try:
        doc = status_page.fetch(url)
    except TierdError as e:
        print(f"tierd: {e}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    try:
        text = json.dumps(doc, indent=1) + "\n" if args.json else status_page.render_text(doc)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        print(f"tierd: {url}/status.json: not a tierd status document ({type(e).__name__}:"
              f" {e})", file=sys.stderr)
        return EXIT_NOT_RUNNING
    sys.stdout.write(text)
    return 0
