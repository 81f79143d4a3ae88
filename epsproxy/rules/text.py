"""
Text cut short for log lines and error messages: names, addresses and messages that come
from peers can be arbitrarily long, and a log line should stay one readable line.
"""

from __future__ import annotations

__all__ = ["shorten"]


def shorten(text: str, limit: int = 200) -> str:
    """``text`` itself, or its first ``limit`` characters followed by ``...``."""
    return text if len(text) <= limit else text[:limit] + "..."
