"""
pytest runs our trial TestCases; their ``mktemp()`` makes folders relative to the
working directory, so run the session in a scratch folder instead of the checkout.
"""

import os
import shutil
import tempfile

_scratch = tempfile.mkdtemp(prefix="epsproxy-tests-")


def pytest_configure(config):
    os.chdir(_scratch)


def pytest_unconfigure(config):
    shutil.rmtree(_scratch, ignore_errors=True)
