"""
The settings schema of ``twistd proxy`` (SPEC §14, §14.1, §17).

A proxy role's settings have up to three sections: ``metrics`` (optional), ``public``
(needed by ``--mode public``) and ``private`` (needed by ``--mode private``).  Every
section is strict: a misspelt key stops the program with a message naming it.

Differences from the reference, on purpose:

- ``accept_timeout`` keeps its fraction (the reference truncated it to whole seconds)
  and must be positive: a zero timeout would forget every token at once.
- ``datastore`` may be left out: the embedded store, in the file
  :data:`DEFAULT_DATASTORE_FILE` of twistd's working folder (``--rundir``).
- The data path has explicit, bounded knobs the reference lacked (SPEC §23.1):
  ``max_pending_tokens``, ``read_timeout``, ``splice_buffer_bytes``, ``idle_timeout``.
"""

from __future__ import annotations

from typing import Any

from epsproxy.rules import forms
from epsproxy.rules.credentials import FileSet, tls_file_set
from epsproxy.net.admission import LISTENER_LIMIT_FIELDS, parse_networks
from epsproxy.net.admission import PROCESS_MAX_CONNECTIONS_SETTING
from epsproxy.net.logs import LOG_LEVEL_SETTING
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS
from epsproxy.net.metrics import METRICS_SETTINGS
from epsproxy.net.ratelimit import TCP_RATE_LIMITS
from ..store import DATASTORE_SETTINGS
from epsproxy.net.hostport import parse_host_port
from epsproxy.net.tls import TLS_SETTINGS
from .pooling import DEFAULT_POOL_CAP

__all__ = [
    "DEFAULT_DATASTORE_FILE",
    "PUBLIC_PROXY_SETTINGS",
    "DEFAULT_PRIVATE_DATASTORE_FILE",
    "INTERNAL_ENDPOINT_SETTINGS",
    "PRIVATE_PROXY_SETTINGS",
    "PROXY_SETTINGS",
    "proxy_file_sets",
]

#: The embedded store's file (in the working folder) when ``datastore`` names none.
DEFAULT_DATASTORE_FILE = "public-proxy-announcements.sqlite"

SPLICE_ENGINE = forms.Optional(
    forms.Boolean(), default=True,
    doc="relay spliced TCP pairs in C on a thread of their own (the splice engine, where "
        "it was built); false: in Python on the reactor's thread",
)


def _address(text: str) -> str:
    host, _ = parse_host_port(text)
    if not host:
        raise ValueError("a host is needed (host:port)")
    return text


def _listen_address(text: str) -> str:
    parse_host_port(text)
    return text


def _networks(items: list[str]) -> list[str]:
    parse_networks(items)  # parsed again, once, by the service: this only checks
    return items


def _prefixed(prefix: str, fields: dict[str, forms.Field]) -> dict[str, forms.Field]:
    return {prefix + key: field for key, field in fields.items()}


_ADDRESS = forms.Check(forms.String(min_length=1), _address)
_LISTEN_ADDRESS = forms.Check(forms.String(min_length=1), _listen_address)

PUBLIC_PROXY_SETTINGS = forms.Map(
    {
        "name": forms.Required(
            forms.String(min_length=1, max_length=253),
            doc="operator name of this proxy (= the name of its own endpoint server)",
        ),
        "datastore": forms.Optional(
            DATASTORE_SETTINGS,
            default={"type": "embedded", "settings": {}},
            doc="where announcements are kept (SPEC §8.5)",
        ),
        "tls_bind_address": forms.Optional(
            _LISTEN_ADDRESS, default="localhost:443",
            doc="public listener for client TLS connections (SNI passthrough)",
        ),
        "internal_bind_address": forms.Optional(
            _LISTEN_ADDRESS, default="localhost:9999",
            doc="listener for token connections (P2P parties, private proxies)",
        ),
        "internal_endpoint": forms.Optional(
            _ADDRESS, default="localhost:9999",
            doc="host:port told to the parties to dial; should reach internal_bind_address",
        ),
        "jsonrpc_client": forms.Required(
            JSONRPC_CLIENT_SETTINGS, doc="client to the own endpoint server's gateway"
        ),
        "jsonrpc_server": forms.Required(
            JSONRPC_SERVER_SETTINGS, doc="server that the own endpoint server calls"
        ),
        "tcp_rate_limits": forms.Optional(
            TCP_RATE_LIMITS, default=[], doc="applied to the TLS and internal listeners"
        ),
        "accept_timeout": forms.Optional(
            forms.Float(min=0.001, max=3000), default=10.0,
            doc="seconds a pending token (and a party waiting on it) is kept",
        ),
        "max_pending_tokens": forms.Optional(
            forms.Integer(min=1, max=10_000_000), default=10_000,
            doc="pending tokens at most; requestConnection is refused beyond",
        ),
        "read_timeout": forms.Optional(
            forms.Float(min=0.001, max=600), default=5.0,
            doc="seconds a token connection has to send its 32 token bytes",
        ),
        "splice_buffer_bytes": forms.Optional(
            forms.Integer(min=1024, max=64 * 1024 * 1024), default=256 * 1024,
            doc="bytes buffered per direction of a spliced pair before the sender is paused",
        ),
        "idle_timeout": forms.Optional(
            forms.Float(min=1, max=7 * 86400), default=3600.0,
            doc="seconds without traffic after which a spliced pair is closed",
        ),
        "splice_engine": SPLICE_ENGINE,
        "max_hello_bytes": forms.Optional(
            forms.Integer(min=512, max=1024 * 1024), default=16 * 1024,
            doc="largest ClientHello read on the TLS listener (all its records)",
        ),
        "hello_timeout": forms.Optional(
            forms.Float(min=0.001, max=600), default=5.0,
            doc="seconds a TLS client has to send its whole ClientHello",
        ),
        "hello_timeout_at_cap": forms.Optional(
            forms.Float(min=0.001, max=600), default=0.5,
            doc="while the TLS listener is at tls_max_connections: seconds after which a "
                "connection still without its ClientHello is closed for one waiting",
        ),
        "read_timeout_at_cap": forms.Optional(
            forms.Float(min=0.001, max=600), default=0.5,
            doc="while the internal listener is at internal_max_connections: seconds "
                "after which a connection that has not presented a live token is closed "
                "for one waiting",
        ),
        "proxy_protocol": forms.Optional(
            forms.Boolean(), default=False,
            doc="the TLS listener expects a PROXY v1/v2 header (behind a load balancer)",
        ),
        "proxy_protocol_trusted": forms.Optional(
            forms.Check(forms.StringList(), _networks), default=["127.0.0.1", "::1"],
            doc="with proxy_protocol: the addresses or networks (10.0.0.0/8) whose PROXY "
                "header is believed (the load balancers)",
        ),
        "proxy_protocol_untrusted": forms.Optional(
            forms.String(choices=("refuse", "data")), default="refuse",
            doc="with proxy_protocol, a connection from any other address: refuse (close "
                "it) or data (no header expected: its bytes are the ClientHello)",
        ),
        **_prefixed("tls_", LISTENER_LIMIT_FIELDS),
        **_prefixed("internal_", LISTENER_LIMIT_FIELDS),
        "shutdown_grace": forms.Optional(
            forms.Float(min=0, max=3600), default=30.0,
            doc="on SIGTERM, seconds spliced connections may go on before they are cut",
        ),
        "pool_max_per_operator": forms.Optional(
            forms.Integer(min=0, max=100_000), default=DEFAULT_POOL_CAP,
            doc="idle pooled connections one operator may hold, and an eighth of its "
                "unexpired pool tokens (0: no pool, every TLS client is brokered)",
        ),
        "pool_idle_timeout": forms.Optional(
            forms.Float(min=1, max=7 * 86400), default=300.0,
            doc="seconds an idle pooled connection is kept before it is closed (the "
                "private proxy replaces it)",
        ),
    },
    strict=True,
)
"""The ``public`` section (SPEC §14.1 plus the data path's limits)."""

# -- private proxy (SPEC §14.5) ------------------------------------------------------

#: The private proxy's embedded store (in the working folder) when ``datastore`` names none.
DEFAULT_PRIVATE_DATASTORE_FILE = "private-proxy-announcements.sqlite"

INTERNAL_ENDPOINT_SETTINGS = forms.Map(
    {
        "address": forms.Optional(
            _ADDRESS, default="localhost:8888", doc="the internal server (host:port)"
        ),
        "tls": forms.Optional(
            TLS_SETTINGS,
            doc="terminate TLS with these server settings and forward HTTP; absent: "
            "forward the raw TLS stream (set verify_client: false for ordinary clients)",
        ),
        "jsonrpc_client": forms.Optional(
            JSONRPC_CLIENT_SETTINGS,
            doc="with tls: forward JSON-RPC calls at jsonrpc_path to this server",
        ),
        "jsonrpc_path": forms.Optional(forms.String(pattern=r"/.*"), default="/jsonrpc"),
        "timeout": forms.Optional(
            forms.Float(min=0.001, max=3000), default=30.0,
            doc="seconds: idle timeout of a terminated connection and of each upstream "
            "request",
        ),
        "proxy_protocol": forms.Optional(
            forms.Boolean(), default=False,
            doc="raw forwarding: send a PROXY protocol v2 header to the internal server first",
        ),
        "max_body_bytes": forms.Optional(
            forms.Integer(min=1), default=4 * 1024 * 1024,
            doc="largest request body forwarded (413 beyond)",
        ),
        "max_response_bytes": forms.Optional(
            forms.Integer(min=1), default=16 * 1024 * 1024,
            doc="largest upstream response body forwarded (502 when declared larger; a body "
                "growing beyond is cut off)",
        ),
    },
    strict=True,
)
"""``private.internal_endpoint``: where incoming connections go, and how."""

def _pool_limits(section: dict[str, Any]) -> dict[str, Any]:
    if section["pool_max"] < section["pool_size"]:
        raise forms.FormError("must not be below pool_size", ("pool_max",))
    return section


PRIVATE_PROXY_SETTINGS = forms.Check(forms.Map(
    {
        "name": forms.Required(
            forms.String(min_length=1, max_length=253),
            doc="operator name of this proxy (= the name of its own endpoint server)",
        ),
        "datastore": forms.Optional(
            DATASTORE_SETTINGS,
            default={"type": "embedded", "settings": {}},
            doc="where announcements are kept (SPEC §8.5)",
        ),
        "jsonrpc_client": forms.Required(
            JSONRPC_CLIENT_SETTINGS, doc="client to the own endpoint server's gateway"
        ),
        "jsonrpc_server": forms.Required(
            JSONRPC_SERVER_SETTINGS, doc="server that the own endpoint server calls"
        ),
        "internal_endpoint": forms.Optional(
            INTERNAL_ENDPOINT_SETTINGS,
            default=INTERNAL_ENDPOINT_SETTINGS.validate({}),
            doc="the internal server incoming connections are forwarded to",
        ),
        "reannounce_interval": forms.Optional(
            forms.Float(min=1, max=86400), default=600.0,
            doc="seconds between re-sending all live announcements to the public proxies",
        ),
        "max_connections": forms.Optional(
            forms.Integer(min=1, max=1_000_000), default=1000,
            doc="incoming connections forwarded at once; incomingConnection gets 503 beyond",
        ),
        "max_connections_per_client": forms.Optional(
            forms.Integer(min=1, max=1_000_000),
            doc="incoming connections forwarded at once for one client (its IPv4 address or "
                "IPv6 /64, as the public proxy names it); default: a quarter of "
                "max_connections; beyond it a pooled connection is closed and "
                "incomingConnection gets 503",
        ),
        "connect_timeout": forms.Optional(
            forms.Float(min=0.001, max=600), default=10.0,
            doc="seconds to connect to the public proxy's endpoint or the internal server",
        ),
        "idle_timeout": forms.Optional(
            forms.Float(min=1, max=7 * 86400), default=3600.0,
            doc="raw forwarding: seconds without traffic after which a connection is closed",
        ),
        "splice_engine": SPLICE_ENGINE,
        "shutdown_grace": forms.Optional(
            forms.Float(min=0, max=3600), default=30.0,
            doc="on SIGTERM, seconds forwarded connections may go on before they are cut",
        ),
        "pool_size": forms.Optional(
            forms.Integer(min=0, max=10_000), default=4,
            doc="idle pre-dialled connections kept at each public proxy of a live "
                "announcement (0: no pool, every connection brokered)",
        ),
        "pool_max": forms.Optional(
            forms.Integer(min=1, max=10_000), default=64,
            doc="most idle pooled connections per public proxy when the pool grows under "
                "load (at least pool_size)",
        ),
        "pool_shrink_after": forms.Optional(
            forms.Float(min=1, max=86400), default=30.0,
            doc="seconds without a brokered connection after which a grown pool shrinks "
                "by one (a used connection is not replaced; no idle one is closed)",
        ),
    },
    strict=True,
), _pool_limits)
"""The ``private`` section (SPEC §14.5 plus limits and the PROXY protocol switch)."""

PROXY_SETTINGS = forms.Map(
    {
        "metrics": forms.Optional(METRICS_SETTINGS),
        "public": forms.Optional(PUBLIC_PROXY_SETTINGS),
        "private": forms.Optional(PRIVATE_PROXY_SETTINGS),
        "log_level": LOG_LEVEL_SETTING,
        "max_connections": PROCESS_MAX_CONNECTIONS_SETTING,
    },
    strict=True,
)
"""A proxy role's settings: ``metrics``, ``public`` and ``private`` (SPEC §14)."""



def _client_tls(where: str, client: dict[str, Any] | None, operator: str | None) -> list[FileSet]:
    """A JSON-RPC client's ``tls`` block, when it is used (an ``https:`` endpoint)."""
    if client is None or client.get("tls") is None or not client["endpoint"].startswith("https:"):
        return []
    return [tls_file_set(f"{where}.tls", client["tls"], operator)]


def proxy_file_sets(settings: dict[str, Any], mode: str) -> list[FileSet]:
    """
    The credential files the proxy in ``mode`` (``public`` or ``private``) uses, from
    validated settings that have that section.  The client to the proxy's own endpoint
    server presents the proxy's operator identity, so its certificate must name the
    section's ``name``; the servers' and the internal endpoint's certificates are not
    tied to an operator name.
    """
    section = settings[mode]
    name = section["name"]
    sets: list[FileSet] = []
    server_tls = section["jsonrpc_server"].get("tls")
    if server_tls is not None:
        sets.append(tls_file_set(f"{mode}.jsonrpc_server.tls", server_tls))
    sets += _client_tls(f"{mode}.jsonrpc_client", section["jsonrpc_client"], name)
    if mode == "private":
        endpoint = section["internal_endpoint"]
        if endpoint.get("tls") is not None:
            sets.append(tls_file_set(f"{mode}.internal_endpoint.tls", endpoint["tls"]))
        sets += _client_tls(
            f"{mode}.internal_endpoint.jsonrpc_client", endpoint.get("jsonrpc_client"), None
        )
    return sets
