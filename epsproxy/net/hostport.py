"""
Host and port text, IP checks, and addresses blurred for logs: one home for each.

- :func:`parse_host_port` reads the ``host:port`` text of settings and JSON-RPC
  parameters (``host:port``, ``[v6]:port``, ``:port``) and :func:`format_host_port`
  writes it back.  This is not the EPS return address of a request id
  (:mod:`epsproxy.eps.addresses`).
- :func:`is_ip` and :func:`valid_host` say whether a text is an IP address, or a host
  name or IP address safe to connect to or to write into a request line.
- :func:`peer_key` names a peer by its address (an IPv6 peer by its /64 network, SPEC
  §23.1 #11), and :func:`truncate_ip` blurs an address so that logs never hold a whole
  client address (STYLE, habit 7).

Standard library only: these are facts about text, not about the network.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Any

__all__ = [
    "format_host_port",
    "host_key",
    "is_ip",
    "parse_host_port",
    "peer_key",
    "truncate_ip",
    "valid_host",
]

_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})?")
_PORT = re.compile(r"[0-9]{1,5}")
# Python accepts any text after "%" as an IPv6 scope, CR and LF included, and a host is
# written into request lines (HTTP CONNECT): a scope must look like an interface name.
_SCOPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _safe_scope(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    scope = getattr(ip, "scope_id", None)
    return scope is None or bool(_SCOPE.fullmatch(scope))


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (no brackets)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return _safe_scope(ip)


def valid_host(host: str) -> bool:
    """Whether ``host`` is a plausible host name or an IP address."""
    return bool(_HOST.fullmatch(host)) or is_ip(host)


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """
    ``"host:port"``, ``"[v6]:port"`` or ``":port"`` (host ``""``: all interfaces) as
    ``(host, port)``; IPv6 hosts come back without brackets.  Without a port the
    ``default_port`` is used when given.  Anything else raises ValueError saying why.
    Cached (a pure function of its arguments; a proxy parses its internal server's
    address for every client it dials).
    """
    if not isinstance(text, str):
        raise ValueError(f"address must be a string, got {type(text).__name__}")
    if default_port is not None and not isinstance(default_port, int):
        raise ValueError(f"default port must be an integer, got {type(default_port).__name__}")
    return _parse_host_port(text, default_port)


@lru_cache(maxsize=1024)
def _parse_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"address {text!r}: missing ']' after the IPv6 address")
        try:
            safe = _safe_scope(ipaddress.IPv6Address(host))
        except ValueError:
            safe = False
        if not safe:
            raise ValueError(f"address {text!r}: {host!r} is not an IPv6 address")
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"address {text!r}: unexpected text after ']'")
    else:
        if text.count(":") > 1:
            raise ValueError(f"address {text!r}: write IPv6 addresses as [address]:port")
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if host and not _HOST.fullmatch(host):
            raise ValueError(f"address {text!r}: {host!r} is not a host name or address")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"address {text!r}: no port given (expected host:port)")
        port = default_port
    elif not _PORT.fullmatch(port_text):
        raise ValueError(f"address {text!r}: port {port_text!r} is not a number")
    else:
        port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"address {text!r}: port {port} is out of range 0-65535")
    return host, port


def format_host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: what :func:`parse_host_port` reads."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_key(address: Any) -> str:
    """
    The key of a peer (``IAddress``): its IPv4 address, the /64 network of an IPv6 address,
    or the textual address for anything else (UNIX sockets share one key).
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return str(type(address).__name__)
    return host_key(host)


@lru_cache(maxsize=4096)
def host_key(host: str) -> str:
    """
    :func:`peer_key` of a host text (an IPv4 address, an IPv6 address, or other text).
    Cached: asked at every accept, and the same clients come back.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@lru_cache(maxsize=4096)
def truncate_ip(text: str) -> str:
    """
    An address safe to log: IPv4 keeps two octets, IPv6 two groups (``2001:db8::/32``).
    Cached (a pure function of the text, asked per connection).
    """
    try:
        ip = ipaddress.ip_address(text.split("/", 1)[0])
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv4Address):
        a, b, _, _ = str(ip).split(".")
        return f"{a}.{b}.x.x"
    groups = ip.exploded.split(":")[:2]
    return ":".join(f"{int(g, 16):x}" for g in groups) + "::/32"
