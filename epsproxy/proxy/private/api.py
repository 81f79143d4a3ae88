"""
The private proxy's JSON-RPC API (SPEC §14.5): :class:`PrivateProxy` holds the methods the
own endpoint server calls:

- ``announceConnection`` (checked against the *caller's* directory settings, stored, and
  forwarded to the public proxy as ``"<proxy>.announceConnections"``);
- ``incomingConnection`` (from the public proxy the domain was announced to), served by a
  :class:`~epsproxy.proxy.private.forwarding.Forwarder`;
- ``getAnnouncements``.

All live announcements are re-sent by :meth:`PrivateProxy.reannounce` (at start and every
``reannounce_interval`` seconds, one call per public proxy; failures are logged and retried
the next round).  Expired announcements are not re-announced, and the store is written only
on changes (SPEC §23.1 #7); concurrent forwarded connections are capped
(``max_connections``, 503 beyond).

``incomingConnection`` calls are counted (:attr:`PrivateProxy.incoming_calls`): with a
connection pool (:mod:`epsproxy.proxy.private.pool`) each one is a fallback of the public
proxy (no idle pooled connection), and the pool is told so it can grow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from epsproxy.net.hostport import parse_host_port
from epsproxy.net.jsonrpc.client import JSONRPCClient
from epsproxy.net.jsonrpc.envelope import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CallContext,
    Dispatcher,
    JSONRPCError,
    TransportError,
    random_id,
)
from epsproxy.net.token import TokenError, decode_token
from epsproxy.proxy.announcements import (
    CLIENT_INFO,
    DOMAIN,
    GET_ANNOUNCEMENTS_PARAMS,
    NOT_AUTHORIZED,
    OPERATOR,
    AnnouncementError,
    PrivateAnnouncements,
    allowed_domains,
    domain_allowed,
    parse_expires_at,
)
from epsproxy.proxy.private.forwarding import Forwarder, proxy_v2_header
from epsproxy.rules import forms
from epsproxy.rules.certificates import certificate_names
from epsproxy.rules.text import shorten

if TYPE_CHECKING:
    from epsproxy.proxy.private.pool import PoolKeeper

__all__ = [
    "NOT_FOUND",
    "TOO_MANY_CONNECTIONS",
    "NOT_AUTHORIZED",
    "ANNOUNCE_CONNECTION_PARAMS",
    "INCOMING_CONNECTION_PARAMS",
    "PrivateProxy",
]

log = Logger()

#: ``incomingConnection`` for a domain not (or no longer) announced to the caller.
NOT_FOUND = 404
#: ``incomingConnection`` while ``max_connections`` connections are being forwarded.
TOO_MANY_CONNECTIONS = 503
_ADDRESS_TEXT = forms.String(min_length=1, max_length=300)

ANNOUNCE_CONNECTION_PARAMS = forms.Map(
    {
        "proxy": forms.Required(OPERATOR),
        "domain": forms.Required(DOMAIN),
        "expires_at": forms.Optional(forms.String(max_length=64)),
        "_client": forms.Optional(CLIENT_INFO),
    }
)
"""Params of ``announceConnection`` (SPEC §14.5)."""

INCOMING_CONNECTION_PARAMS = forms.Map(
    {
        "token": forms.Required(forms.String(max_length=128)),
        "endpoint": forms.Required(_ADDRESS_TEXT),
        "domain": forms.Required(DOMAIN),
        "client_address": forms.Optional(_ADDRESS_TEXT),
        "server_address": forms.Optional(_ADDRESS_TEXT),
        "_client": forms.Optional(CLIENT_INFO),
    }
)
"""Params of ``incomingConnection`` (SPEC §14.5, plus the optional client address)."""


def _as_rpc(e: AnnouncementError) -> JSONRPCError:
    return JSONRPCError(e.code, e.message, e.data)


class PrivateProxy:
    """
    The JSON-RPC methods of a private proxy named ``name`` (SPEC §14.5).

    ``client`` calls the own endpoint server (which routes ``"<proxy>.announceConnections"``
    to the public proxy).  With ``verify_caller`` a call is served only if the caller's
    (verified) certificate names ``name``: the own endpoint server.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        name: str,
        announcements: PrivateAnnouncements,
        client: JSONRPCClient,
        forwarder: Forwarder,
        *,
        proxy_protocol: bool = False,
        verify_caller: bool = False,
        call_timeout: float | None = None,
        pool: PoolKeeper | None = None,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.announcements = announcements
        self.client = client
        self.forwarder = forwarder
        self.proxy_protocol = proxy_protocol
        self.verify_caller = verify_caller
        self.call_timeout = call_timeout
        self.pool = pool
        self.reannounced = 0
        self.reannounce_failures = 0
        #: ``incomingConnection`` calls from authorized callers (brokered connections).
        self.incoming_calls = 0

    def dispatcher(self) -> Dispatcher:
        """A dispatcher serving this proxy's methods."""
        dispatcher = Dispatcher()
        dispatcher.register(
            "announceConnection", ANNOUNCE_CONNECTION_PARAMS, self.announce_connection
        )
        dispatcher.register(
            "incomingConnection", INCOMING_CONNECTION_PARAMS, self.incoming_connection
        )
        dispatcher.register("getAnnouncements", GET_ANNOUNCEMENTS_PARAMS, self.get_announcements)
        return dispatcher

    def _caller(self, params: dict[str, Any], context: CallContext) -> dict[str, Any]:
        if self.verify_caller:
            certificate = context.peer_certificate
            if certificate is None or self.name not in certificate_names(certificate):
                raise JSONRPCError(
                    NOT_AUTHORIZED,
                    "not authorized: only the proxy's own endpoint server may call it",
                )
        client = params.get("_client")
        if client is None:
            raise JSONRPCError(
                NOT_AUTHORIZED, "not authorized: _client is needed (call through the "
                "endpoint server)",
            )
        return client

    def get_announcements(
        self, params: dict[str, Any], context: CallContext
    ) -> list[dict[str, Any]]:
        """``getAnnouncements``: the live announcements ``{expires_at, proxy, domain}``."""
        return self.announcements.announcements()

    def announce_connection(
        self, params: dict[str, Any], context: CallContext
    ) -> Deferred[str]:
        """
        ``announceConnection {proxy, domain, expires_at?}``: store the announcement and
        send it to ``proxy``; ``"ok"``.  Errors: 400 (proxy is this proxy), 403 (caller
        not authorized, or domain not allowed: ``data.allowed_domains``), 500 (invalid
        directory settings), -32602 (expires_at), -32603 (store or forwarding failed),
        and per-item refusals of the public proxy (403, 409) passed on.
        """
        client = self._caller(params, context)
        proxy, domain = params["proxy"], params["domain"].lower()
        if proxy == self.name:
            raise JSONRPCError(400, "trying to announce with private proxy name")
        try:
            allowed = allowed_domains(client, self.name)
            if not domain_allowed(domain, allowed):
                raise JSONRPCError(
                    403, "not allowed to forward this domain", {"allowed_domains": allowed}
                )
            expires_at, expires_ns = parse_expires_at(
                params.get("expires_at"), self.reactor.seconds()
            )
        except AnnouncementError as e:
            raise _as_rpc(e) from None
        return ensureDeferred(self._announce(client["name"], domain, proxy, expires_at, expires_ns))

    async def _announce(
        self, caller: str, domain: str, proxy: str, expires_at: str | None,
        expires_ns: int | None,
    ) -> str:
        try:
            announcement = await self.announcements.upsert(domain, proxy, expires_at, expires_ns)
        except AnnouncementError as e:
            raise _as_rpc(e) from None
        log.info("{caller} announced {domain} at {proxy} (expires {expires})",
                 caller=shorten(caller), domain=domain, proxy=shorten(proxy),
                 expires=expires_at or "never")
        try:
            results = await self.client.call(
                f"{proxy}.announceConnections", {"connections": [announcement.connection()]},
                id=random_id(), timeout=self.call_timeout,
            )
        except JSONRPCError as e:
            log.warn("{proxy} refused the announcement of {domain}: {message} ({code})",
                     proxy=shorten(proxy), domain=domain, message=shorten(e.message), code=e.code)
            raise JSONRPCError(e.code, e.message, e.data) from None
        except TransportError as e:
            log.warn("cannot announce {domain} at {proxy}: {error}",
                     domain=domain, proxy=shorten(proxy), error=shorten(str(e), 300))
            raise JSONRPCError(
                INTERNAL_ERROR, f"cannot reach {proxy} through the proxy's endpoint server"
            ) from None
        item = results[0] if isinstance(results, list) and len(results) == 1 else None
        if isinstance(item, dict) and isinstance(item.get("code"), int):
            message = item.get("message")
            raise JSONRPCError(item["code"], message if isinstance(message, str) else "refused")
        return "ok"

    def incoming_connection(
        self, params: dict[str, Any], context: CallContext
    ) -> dict[str, str]:
        """
        ``incomingConnection {token, endpoint, domain}`` from the public proxy the domain
        was announced to: ``{"message": "ok"}``, then the connection is served in the
        background.  404 without a live announcement to the caller, 503 when busy.
        """
        client = self._caller(params, context)
        self.incoming_calls += 1
        domain = params["domain"]
        try:
            token = decode_token(params["token"])
        except TokenError as e:
            raise JSONRPCError(INVALID_PARAMS, f"invalid params: {e}") from None
        try:
            parse_host_port(params["endpoint"])
        except ValueError:
            raise JSONRPCError(INVALID_PARAMS, "invalid params: endpoint is not host:port") \
                from None
        header = None
        if self.proxy_protocol and not self.forwarder.terminate:
            try:
                header = proxy_v2_header(params.get("client_address"),
                                         params.get("server_address"))
            except ValueError:
                header = proxy_v2_header(None)
        if not self.announcements.is_live(domain, client["name"]):
            raise JSONRPCError(NOT_FOUND, "no matching connection found")
        if self.pool is not None:
            self.pool.fallback(client["name"])  # the public proxy found no idle one
        if self.forwarder.busy:
            raise JSONRPCError(TOO_MANY_CONNECTIONS, "too many connections, try again later")
        if not self.forwarder.admits(params.get("client_address")):
            raise JSONRPCError(TOO_MANY_CONNECTIONS,
                               "too many connections from this client, try again later")
        self.forwarder.forward(params["endpoint"], token, header,
                               client=params.get("client_address"))
        return {"message": "ok"}

    def reannounce(self) -> Deferred[None]:
        """
        Send every live announcement again, one call per public proxy; failures are
        logged (and retried at the next round), never raised.
        """
        return ensureDeferred(self._reannounce())

    async def _reannounce(self) -> None:
        for proxy, items in sorted(self.announcements.by_proxy().items()):
            connections = [a.connection() for a in items]
            try:
                results = await self.client.call(
                    f"{proxy}.announceConnections", {"connections": connections},
                    id=random_id(), timeout=self.call_timeout,
                )
            except defer.CancelledError:
                raise
            except Exception as e:
                self.reannounce_failures += 1
                log.warn("cannot re-announce {count} domain(s) at {proxy}: {error}",
                         count=len(connections), proxy=shorten(proxy),
                         error=shorten(str(e), 300))
                continue
            self.reannounced += 1
            refused = [
                (a.domain, r) for a, r in zip(items, results if isinstance(results, list) else [])
                if r is not None
            ]
            for domain, result in refused:
                log.warn("{proxy} refused the announcement of {domain}: {result}",
                         proxy=shorten(proxy), domain=domain, result=shorten(str(result)))
            log.info("re-announced {count} domain(s) at {proxy}",
                     count=len(connections), proxy=shorten(proxy))
