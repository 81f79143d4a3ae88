"""
The test PKI: a whole dev PKI is expensive, so it is made once per test process in a
temporary folder and removed when the process exits.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path


@functools.lru_cache(maxsize=None)
def _pki_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="epsproxy-test-pki-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def pki(label: str = "main"):
    """
    A complete dev PKI (``epsproxy.dev.pki.create_pki``) for tests, made once per process.

    ``pki()`` is the one the tests trust; ``pki("foreign")`` is an unrelated CA with the
    same names, for "certificate from another CA" refusals.
    """
    return _pki(label)


@functools.lru_cache(maxsize=None)
def _pki(label: str):
    from epsproxy.dev.pki import create_pki

    base = _pki_root() / label
    return create_pki(base / "certs", directory_dir=base / "directory")
