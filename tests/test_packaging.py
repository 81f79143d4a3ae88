"""setup.cfg lists its packages by hand (twisted.plugins needs that): none may be missed."""

from __future__ import annotations

import configparser
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class PackageListTests(unittest.TestCase):
    def test_every_package_is_shipped(self) -> None:
        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        listed = set(config["options"]["packages"].split())
        on_disk = {
            ".".join(init.parent.relative_to(ROOT).parts)
            for init in (ROOT / "epsproxy").rglob("__init__.py")
        }
        self.assertEqual(sorted(on_disk - listed), [])
        self.assertEqual(sorted(listed - on_disk - {"twisted.plugins"}), [])
