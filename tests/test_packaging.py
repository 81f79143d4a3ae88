"""
setup.cfg lists its packages by hand (twisted.plugins needs that): none may be missed;
and a built wheel carries the LICENSE, the example settings, the docs and the compiled
splice engine.
"""

from __future__ import annotations

import configparser
import os
import shutil
import sys
import unittest
import zipfile
from pathlib import Path

from twisted.internet import reactor, utils
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase as TwistedTestCase

from epsproxy.examples import PROGRAMS

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


BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md",
                "LICENSE", "epsproxy", "twisted", "docs")


class WheelContentTests(TwistedTestCase):
    """A wheel built from this checkout ships LICENSE, the example settings and the docs."""

    timeout = 300

    @inlineCallbacks
    def test_wheel_contents(self):
        base = Path(self.mktemp()).resolve()
        # A copy of what the build reads, so no build/ folder is left in the checkout.
        source = base / "source"
        for name in BUILD_INPUTS:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, source / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
            else:
                source.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / name, source / name)
        out_dir = base / "wheel"
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out_dir), str(source)],
            env=dict(os.environ), path=str(base), reactor=reactor,
        )
        self.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))
        [wheel] = out_dir.glob("epsproxy-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            license_files = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
            self.assertEqual(len(license_files), 1, sorted(names))
            self.assertEqual(archive.read(license_files[0]),
                             (ROOT / "LICENSE").read_bytes())
            for program, path in PROGRAMS.items():
                self.assertIn(f"epsproxy/examples/settings/{path}", names, program)
            docs = {n.rsplit("/", 1)[1] for n in names if "/data/share/doc/epsproxy/" in n}
            self.assertTrue({p.name for p in (ROOT / "docs").glob("*.md")} <= docs, docs)
            # The splice engine is compiled into the wheel (and typed for its callers).
            engine = [n for n in names if n.startswith("epsproxy/proxy/_splice_engine.")
                      and n.endswith(".so")]
            self.assertEqual(len(engine), 1, sorted(names))
            self.assertIn("epsproxy/proxy/_splice_engine.pyi", names)
            metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
            self.assertIn(b"AGPL-3.0-or-later", archive.read(metadata))
        self.assertIn(b"GNU AFFERO GENERAL PUBLIC LICENSE", (ROOT / "LICENSE").read_bytes())
