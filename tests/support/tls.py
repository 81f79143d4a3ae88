"""``tls`` settings blocks made from the test PKI."""

from __future__ import annotations

from typing import Any

from tests.support.pki import pki


def tls_block(
    name: str | None = None, *, source: str = "main", alt: bool = False, ca: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """
    A ``tls`` settings block trusting ``ca`` (the main root unless given) and, with a
    ``name``, presenting ``name``'s TLS identity from PKI ``source``; ``extra`` is added.
    """
    result: dict[str, Any] = {"ca_certificate_files": [str(ca or pki().root)]}
    if name is not None:
        # pki() and pki("main") are distinct lru_cache keys: always call pki() for main.
        crt, key = (pki() if source == "main" else pki(source)).tls(name, alt=alt)
        result.update(certificate_file=str(crt), key_file=str(key))
    result.update(extra)
    return result
