"""epsproxy.rules.text: peer-supplied text cut short for log lines and error messages."""

from __future__ import annotations

import unittest

from epsproxy.rules.text import shorten


class ShortenTests(unittest.TestCase):
    def test_short_text_is_kept(self) -> None:
        self.assertEqual(shorten("hd-1"), "hd-1")
        self.assertEqual(shorten("x" * 200), "x" * 200)

    def test_long_text_is_cut_and_marked(self) -> None:
        self.assertEqual(shorten("x" * 201), "x" * 200 + "...")
        self.assertEqual(shorten("abcdef", 3), "abc...")
