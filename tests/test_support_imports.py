"""
Test modules import shared helpers from ``tests/support``, never from one another
(issue 11): a helper that lives in another test module is hard to find, and a change to
that module silently changes the tests of its importers.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

TESTS = Path(__file__).parent


def imports_of_test_modules(path: Path, test_modules: set[str]) -> list[str]:
    """The other ``tests/test_*.py`` modules that ``path`` imports, as ``line: module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level > 1:
                continue
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] != "tests":
                continue
            inside = parts[1:] if node.level == 0 else parts
            inside = [p for p in inside if p]
            candidates = inside[:1] or [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name.split(".")[1] for alias in node.names
                          if alias.name.startswith("tests.") and alias.name.count(".") >= 1]
        else:
            continue
        for name in candidates:
            if name in test_modules and name != path.stem:
                found.append(f"{node.lineno}: {name}")
    return found


class NoTestModuleImportsAnother(SynchronousTestCase):
    def test_no_test_module_imports_another(self):
        paths = sorted(TESTS.glob("test_*.py"))
        names = {p.stem for p in paths}
        offenders = {p.name: imports_of_test_modules(p, names) for p in paths}
        self.assertEqual({name: found for name, found in offenders.items() if found}, {})

    def test_the_check_sees_every_import_form(self):
        """Absolute, relative, ``from tests import`` and ``import tests.…`` are all caught."""
        sample = self.mktemp() + ".py"
        Path(sample).write_text(
            "from tests.test_a import x\n"
            "from .test_a import y\n"
            "from tests import test_a\n"
            "from . import test_a as other\n"
            "import tests.test_a\n"
            "def f():\n"
            "    from tests.test_a import z\n"
            "from tests.support.pki import pki\n"
            "from .support import tls\n"
        )
        found = imports_of_test_modules(Path(sample), {"test_a", "test_b"})
        self.assertEqual(found, ["1: test_a", "2: test_a", "3: test_a", "4: test_a",
                                 "5: test_a", "7: test_a"])
