"""
What a public proxy and a private proxy agree on for pooled connections (issue 14): the
facts both sides of the connection pool use, in one place.

A private proxy keeps idle connections open at the public proxy's internal endpoint, so a
new TLS client can be served without a brokering round trip:

1. The private proxy asks for pool tokens through its own endpoint server:
   ``"<public proxy>.requestPoolTokens" {"count": n}`` (:data:`REQUEST_POOL_TOKENS`,
   params :data:`REQUEST_POOL_TOKENS_PARAMS`).  The public proxy answers
   ``{"tokens": [base64, ...], "endpoint": "host:port", "expires_in": seconds}``
   (:data:`POOL_TOKENS_RESULT`): at most ``n`` tokens, fewer (even none) at its cap.
   Only an operator with a live announcement at that proxy gets tokens (404 otherwise).
   Each token is single-use and expires ``expires_in`` seconds after it was handed out.
2. For each token the private proxy dials the endpoint and writes the 32 token bytes
   (as for a brokered connection), then waits, sending nothing.  The public proxy keeps
   the connection idle in the operator's pool.  Both ends turn on TCP keepalive
   (:func:`keep_alive`; the public proxy once, on its internal listener, whose accepted
   connections inherit it) so a dead idle connection is noticed without traffic.
3. When a TLS client asks for a name the operator holds a live announcement for, the
   public proxy takes one idle connection of that operator and writes
   :func:`pool_header` (a PROXY v2 header: the client's address, the address it
   connected to, and the server name in the ``PP2_TYPE_AUTHORITY`` TLV), then the
   client's buffered ClientHello, then splices the two.  The private proxy reads the
   header with :class:`epsproxy.net.proxy_protocol.ProxyHeaderReader`, checks the name
   is one it announced to that proxy, and serves the connection like a brokered one.
4. With no idle connection for the operator the public proxy falls back to the brokered
   path (``incomingConnection``).

Pool tokens, pairing tokens and the internal endpoint are the same kind of thing (see
:mod:`epsproxy.net.token`); this module only adds what is particular to the pool.
"""

from __future__ import annotations

import socket
from typing import Any

from epsproxy.net.proxy_protocol import MAX_PROXY_HEADER, proxy_v2_header
from epsproxy.rules import forms

__all__ = [
    "DEFAULT_POOL_CAP",
    "EARLIER_MAX_TOKENS_PER_REQUEST",
    "LEGACY_MAX_TOKENS_PER_REQUEST",
    "MAX_POOL_HEADER",
    "MAX_TOKENS_PER_REQUEST",
    "POOL_TOKENS_RESULT",
    "REQUEST_POOL_TOKENS",
    "REQUEST_POOL_TOKENS_PARAMS",
    "keep_alive",
    "keep_alive_socket",
    "pool_header",
    "token_cap",
]

#: The public proxy's method that hands out pool tokens.
REQUEST_POOL_TOKENS = "requestPoolTokens"

#: The most tokens one ``requestPoolTokens`` call may ask for (an answer of 1,024 tokens
#: is about 48 KB of JSON).  A call's cost is mostly its trip through two endpoint
#: servers, not its size, and it holds up the connections in flight at both proxies:
#: a busy private proxy makes fewer, larger calls (issue 14: at 256 per call, the calls
#: were what set the p99 latency at one client).
MAX_TOKENS_PER_REQUEST = 1024

#: The most that public proxies released before 2026-12-03 accept per call (they answer
#: a larger count with invalid params): a private proxy falls back to it for such a proxy.
LEGACY_MAX_TOKENS_PER_REQUEST = 64

#: What public proxies of earlier versions accept per call, the newest first (released
#: 2026-12-03 to 2026-12-04: 256; before: :data:`LEGACY_MAX_TOKENS_PER_REQUEST`).  A
#: private proxy whose count a public proxy answers with invalid params steps down to the
#: next of these below that count.
EARLIER_MAX_TOKENS_PER_REQUEST = (256, LEGACY_MAX_TOKENS_PER_REQUEST)

#: The public proxy's default cap on one operator's idle pooled connections (setting
#: ``pool_max_per_operator``).  Its unused pool tokens are capped at
#: :func:`token_cap` of it; a private proxy keeps its spare tokens within the default's,
#: so that its requests are not refused for being over it.
DEFAULT_POOL_CAP = 64


def token_cap(max_connections: int) -> int:
    """
    The most unused pool tokens one operator may hold at a public proxy whose cap on its
    idle connections is ``max_connections``: 32 times that (2,048 for the default cap; a
    token held costs the public proxy about 140 bytes, so 290 KB at the default cap).
    Tokens hold no descriptor (a connection presenting one is still refused over
    ``max_connections``), and a private proxy holding more of them than it keeps
    connections asks less often: each call crosses two endpoint servers and holds up the
    connections in flight at both proxies.
    """
    return 32 * max_connections

#: The largest header a private proxy reads on a pooled connection (a PROXY v2 header
#: with two IPv6 addresses and a 253-byte name is 300 bytes).
MAX_POOL_HEADER = min(MAX_PROXY_HEADER, 1024)

REQUEST_POOL_TOKENS_PARAMS = forms.Map(
    {
        "count": forms.Required(forms.Integer(min=1, max=MAX_TOKENS_PER_REQUEST)),
        "_client": forms.Optional(forms.AnyMap()),
    }
)
"""Params of ``requestPoolTokens``; ``_client`` is injected by the endpoint server."""

POOL_TOKENS_RESULT = forms.Map(
    {
        "tokens": forms.Required(forms.List(forms.String(min_length=1, max_length=128),
                                            max_length=MAX_TOKENS_PER_REQUEST)),
        "endpoint": forms.Required(forms.String(min_length=1, max_length=300)),
        "expires_in": forms.Required(forms.Float(min=0, max=86400)),
    }
)
"""The result of ``requestPoolTokens``, as the private proxy checks it."""

# TCP keepalive of an idle pooled connection: first probe after this many idle seconds,
# then every KEEPALIVE_INTERVAL, given up after KEEPALIVE_PROBES unanswered probes.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_PROBES = 3


def keep_alive(transport: Any) -> None:
    """
    Turn on TCP keepalive on a pooled connection's socket (Linux: first probe after
    :data:`KEEPALIVE_IDLE` seconds; elsewhere the system's timers).  A transport without
    a socket (a test transport) is left alone.
    """
    sock = getattr(transport, "socket", None)
    if sock is None or not hasattr(transport, "setTcpKeepAlive"):
        return
    keep_alive_socket(sock)


def keep_alive_socket(sock: socket.socket) -> None:
    """
    TCP keepalive on ``sock`` as :func:`keep_alive` sets it.  On a listening socket,
    every connection it accepts has it from the start (Linux copies a listener's socket
    options to the connections it accepts): four system calls once, not per connection.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                          ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                          ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        number = getattr(socket, option, None)
        if number is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, number, value)
            except OSError:
                pass


def pool_header(domain: str, client: str | Any | None, server: str | Any | None = None) -> bytes:
    """
    The header the public proxy writes on a pooled connection before the ClientHello:
    PROXY v2 from ``client`` to ``server`` (``"ip:port"`` or address objects, as
    :func:`~epsproxy.net.proxy_protocol.proxy_v2_header` takes them; a ``LOCAL`` command when the
    client's address is unknown or unusable; without ``server`` when only that is) with
    ``domain`` as the authority TLV.  Raises ValueError for a name that does not fit
    (empty, over 255 bytes).
    """
    for source, target in ((client, server), (client, None), (None, None)):
        try:
            return proxy_v2_header(source, target, authority=domain)
        except ValueError:
            if source is None:
                raise  # the name itself is unusable
    raise AssertionError("unreachable")  # pragma: no cover
