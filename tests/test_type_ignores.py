"""
Every ``# type: ignore`` in the package names its error code and says why (issue 11):
``x = y  # type: ignore[attr-defined]  # set by Twisted's HTTPChannel``.  mypy itself
checks the code (``ignore-without-code``) and that the ignore is still needed
(``warn_unused_ignores``); the reason is for the reader, so it is checked here.
"""

from __future__ import annotations

import re
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = [ROOT / "epsproxy", ROOT / "twisted" / "plugins"]

IGNORE = re.compile(r"#\s*type:\s*ignore")
WITH_REASON = re.compile(r"#\s*type:\s*ignore\[[a-z0-9, -]+\]\s*#\s*\S")


def unexplained_ignores() -> list[str]:
    """``path:line`` of each ``# type: ignore`` without a code and a reason after it."""
    found = []
    for top in CHECKED:
        for path in sorted(top.rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                if IGNORE.search(line) and not WITH_REASON.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}")
    return found


class TypeIgnoreTests(unittest.TestCase):
    maxDiff = None

    def test_every_ignore_says_why(self) -> None:
        self.assertEqual(unexplained_ignores(), [])

    def test_pattern(self) -> None:
        self.assertTrue(WITH_REASON.search("x  # type: ignore[attr-defined]  # Twisted sets it"))
        self.assertFalse(WITH_REASON.search("x  # type: ignore[attr-defined]"))
        self.assertFalse(WITH_REASON.search("x  # type: ignore  # no code"))
