"""Counts and sizes in messages: "1 interval", "2 intervals", "1.5 MiB"."""

from __future__ import annotations

MIB = 1 << 20


def plural(count: int, noun: str) -> str:
    """'1 interval', '0 intervals', '12 intervals' (nouns here take an s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.1f} MiB"
