"""Which source revision this tierd was built from (the revision label of tierd_build_info).

A package build writes tierd/_revision.py (setup.py, from `git rev-parse`);
a checkout run in place asks git; anything else is "unknown".
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def git_revision(tree: Path) -> str | None:
    """The short commit id of the checkout at tree, or None outside one."""
    if not (tree / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


@functools.cache
def revision() -> str:
    try:
        from tierd._revision import REVISION  # type: ignore[import-not-found]
    except ImportError:
        return git_revision(CHECKOUT) or "unknown"
    return str(REVISION)
