"""
The channels that connect an EPS to other EPS servers (SPEC §12.6, §12.7), over our
line-framed mutual-TLS protocol instead of the reference's gRPC:

- :class:`EPSServerChannel` (``eps_server``, alias ``grpc_server``) listens for peers,
  and serves connections handed to it after a proxy rendezvous (``_connectionRequest``);
  it delivers to peers that are connected to us.
- :class:`EPSClientChannel` (``eps_client``, alias ``grpc_client``) delivers to peers
  whose directory entry names a reachable server, over a link from its
  :class:`~epsproxy.eps.links.dialer.Dialer` (which also keeps links open to the peers
  that may call us, so a node without a reachable server still receives calls).

Links are reused for every call in both directions, many calls in flight at once, and
calls have a timeout (SPEC §23.2 #14-#17).  The links themselves are
:mod:`epsproxy.eps.links`; :mod:`epsproxy.eps.inbox` carries requests between them and
the broker.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from epsproxy.rules import forms

from epsproxy.net import admission, ratelimit, tls
from epsproxy.eps import inbox
from epsproxy.eps.addresses import Address, parse_address
from epsproxy.eps.broker import (
    ClientInfo,
    ConnectionRequestHandler,
    Request,
    Response,
    Startable,
)
from epsproxy.eps.links import wire
from epsproxy.eps.links.dialer import SERVER_TYPES, Dialer, Directory, RequestConnection
from epsproxy.eps.links.protocol import EPSConnection
from epsproxy.eps.links.registry import INCOMING, LinkRegistry, link_options
from epsproxy.net.reactor import IReactor
from epsproxy.net.token import TokenError, decode_token, dial_with_token

__all__ = [
    "PeerChannelError",
    "EPS_SERVER_SETTINGS",
    "EPS_CLIENT_SETTINGS",
    "LINK_SETTINGS",
    "EPSServerChannel",
    "EPSClientChannel",
]

log = Logger()


class PeerChannelError(Exception):
    """A peer channel cannot deliver a request (no link, peer unreachable, refused)."""


#: Settings of the links a channel makes or accepts (docs/protocol.md).
LINK_SETTINGS: dict[str, forms.Field] = {
    "max_line_bytes": forms.Optional(
        forms.Integer(min=1024, max=64 * 1024 * 1024), default=wire.DEFAULT_MAX_LINE,
        doc="longest frame accepted or sent, in bytes",
    ),
    "hello_timeout": forms.Optional(forms.Float(min=0.1, max=600), default=10.0),
    "ping_interval": forms.Optional(forms.Float(min=0.1, max=3600), default=30.0),
    "dead_after": forms.Optional(
        forms.Float(min=0.2, max=7200), default=90.0,
        doc="close a link when nothing arrived for this long",
    ),
    "call_timeout": forms.Optional(
        forms.Float(min=0.1, max=3600), default=60.0,
        doc="a call over a link fails when its answer takes longer",
    ),
    "connect_timeout": forms.Optional(forms.Float(min=0.1, max=600), default=10.0),
}

EPS_SERVER_SETTINGS = forms.Map(
    {
        "bind_address": forms.Optional(forms.String(min_length=1), default="localhost:4444"),
        "tls": forms.Required(tls.TLS_SETTINGS),
        "tcp_rate_limits": forms.Optional(ratelimit.TCP_RATE_LIMITS),
        **admission.LISTENER_LIMIT_FIELDS,
        **LINK_SETTINGS,
    },
    strict=True,
)

EPS_CLIENT_SETTINGS = forms.Map(
    {
        "tls": forms.Required(tls.TLS_SETTINGS),
        "use_proxy": forms.Optional(
            forms.Boolean(), default=True,
            doc="reach peers behind a proxy through its peer-to-peer brokering",
        ),
        "useProxy": forms.Optional(forms.Boolean(), doc="the reference's spelling of use_proxy"),
        "proxy_url": forms.Optional(
            forms.String(), doc="HTTP CONNECT proxy for outgoing links (default: HTTPS_PROXY)"
        ),
        "maintenance_interval": forms.Optional(forms.Float(min=0.1, max=3600), default=60.0),
        "idle_timeout": forms.Optional(
            forms.Float(min=1, max=86400), default=300.0,
            doc="close a link we dialled for calls after this long without calls",
        ),
        "reconnect_initial_delay": forms.Optional(forms.Float(min=0.01, max=600), default=1.0),
        "reconnect_max_delay": forms.Optional(forms.Float(min=0.1, max=3600), default=60.0),
        **LINK_SETTINGS,
    },
    strict=True,
)

_CONNECTION_REQUEST = forms.Map(
    {
        "channel": forms.Required(forms.String()),
        "endpoint": forms.Required(forms.String(min_length=1, max_length=300)),
        "token": forms.Required(forms.String(max_length=200)),
        "client": forms.Optional(forms.AnyMap()),
    },
    strict=False,
)

class EPSServerChannel(Startable, ConnectionRequestHandler):
    """
    The ``eps_server`` channel: a mutual-TLS listener for peers (validated
    :data:`EPS_SERVER_SETTINGS`), and delivery to peers linked to us.

    ``refusals(reason)``, if given, counts the peers refused by the listener's links (and
    by the links served after a rendezvous), with the reasons of
    :data:`epsproxy.eps.links.session.PEER_REFUSAL_REASONS`, ``rate_limited`` included.
    """

    type = "eps_server"

    def __init__(
        self,
        name: str,
        own_name: str,
        settings: dict[str, Any],
        links: LinkRegistry,
        reactor: IReactor,
        refusals: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.own_name = own_name
        self.settings = settings
        self.links = links
        self.reactor = reactor
        self.refusals = refusals
        self.port: IListeningPort | None = None
        # Fail at start-up, not at the first connection, on unusable TLS settings.
        tls.server_options(settings["tls"])
        self._endpoint: Any = None
        self._factory: Any = None
        self.limiter = ratelimit.RateLimiter(
            settings.get("tcp_rate_limits") or [], reactor,
            on_refused=None if refusals is None else lambda _: refusals("rate_limited"),
        )
        self.admission = admission.listener_admission(f"channels[{name}]", settings)

    def start(self) -> defer.Deferred[IListeningPort]:
        """Listen on ``bind_address``; fires with the port."""
        endpoint = self._endpoint = tls.listen_endpoint(
            self.reactor, self.settings["bind_address"], self.settings["tls"],
            name=f"channels[{self.name}]", admission=self.admission)
        self._factory = self.links.server_factory(**self._link_options())
        factory = self.limiter.wrap(self._factory)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            address: Any = port.getHost()
            log.info("eps_server channel {channel} listening on {host}:{port}",
                     channel=self.name, host=address.host, port=address.port)
            return port

        return endpoint.listen(factory).addCallback(listening)

    def _link_options(self) -> dict[str, Any]:
        """The options of the links we accept: the settings', and our refusal counter."""
        options = link_options(self.settings)
        if self.refusals is not None:
            options["on_refused"] = self.refusals
        return options

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """
        Use ``settings`` (validated :data:`EPS_SERVER_SETTINGS`, same ``bind_address``)
        for the next connections: TLS files, rate limits, link options and timeouts.
        Open links are kept.  Raises :class:`ValueError` (``TLSSettingsError`` for
        unusable files) having changed nothing.
        """
        if settings["bind_address"] != self.settings["bind_address"]:
            raise ValueError("bind_address: changing it needs a restart")
        limits = ratelimit.TCP_RATE_LIMITS(list(settings.get("tcp_rate_limits") or []))
        options = getattr(self._endpoint, "options", None)
        if isinstance(options, tls.ReloadableServerOptions):
            options.replace(settings["tls"])
        else:
            tls.server_options(settings["tls"])
        self.limiter.reconfigure(limits)
        admission.reconfigure_from(self.admission, settings)
        self.settings = settings
        if self._factory is not None:
            self._factory.options.update(self._link_options())

    def stop(self) -> defer.Deferred[None]:
        """Stop listening (open links are closed by their owner, the registry)."""
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)

    def can_deliver_to(self, address: Address) -> bool:
        """Peers (never ourselves) that have a link to us which they opened."""
        return (
            address.operator != self.own_name
            and self.links.link_to(address.operator, INCOMING) is not None
        )

    def deliver(self, request: Request, client_info: ClientInfo,
                address: Address | None = None) -> defer.Deferred[Response | None]:
        """Send the request over the peer's link; fires with its answer."""
        operator = (address or parse_address(request.id)).operator
        link = self.links.link_to(operator, INCOMING)
        if link is None:
            return defer.fail(PeerChannelError(f"{operator} is no longer connected"))
        return inbox.call(self.links, link, request, self.settings["call_timeout"])

    def handle_connection_request(self, params: dict[str, Any] | None) -> Any:
        """
        ``_connectionRequest`` (SPEC §12.6, §15 step 4): dial the proxy's internal
        endpoint, present the token, and serve the TLS server side of a link on it.
        Requests for another channel type are not ours (None).
        """
        try:
            request = _CONNECTION_REQUEST.validate(params)
        except forms.FormError as e:
            return defer.fail(PeerChannelError(f"invalid connection request: {e}"))
        if request["channel"] not in SERVER_TYPES:
            return None
        try:
            token = decode_token(request["token"])
        except TokenError as e:
            return defer.fail(PeerChannelError(f"invalid connection request: {e}"))
        client = (request.get("client") or {}).get("name", "?")
        log.info("connection request: meeting {client} at {endpoint}",
                 client=str(client)[:200], endpoint=request["endpoint"])
        try:
            d = dial_with_token(
                self.reactor, request["endpoint"], token, self.settings["tls"],
                self.links.server_factory(**self._link_options()),
                tls_client_for=None, timeout=self.settings["connect_timeout"],
            )
        except ValueError as e:
            return defer.fail(PeerChannelError(f"invalid connection request: {e}"))

        def failed(failure: Any) -> Any:
            raise PeerChannelError(
                f"cannot reach the proxy endpoint {request['endpoint']}: "
                f"{failure.getErrorMessage()}"
            )

        return d.addCallbacks(lambda _: Response(id="", result={}), failed)


class EPSClientChannel(Startable):
    """
    The ``eps_client`` channel (validated :data:`EPS_CLIENT_SETTINGS`): delivers to
    peers with a reachable server over a link from its :class:`Dialer` (an open one, or
    a new one), which also keeps links open to the peers that may call us.
    ``request_connection``, if given, lets it reach peers behind a proxy.
    """

    type = "eps_client"

    def __init__(
        self,
        name: str,
        own_name: str,
        settings: dict[str, Any],
        links: LinkRegistry,
        directory: Directory,
        reactor: IReactor,
        request_connection: RequestConnection | None = None,
    ) -> None:
        self.name = name
        self.own_name = own_name
        self.settings = settings
        self.links = links
        tls.client_options(settings["tls"], own_name)  # unusable TLS settings fail now
        self.dialer = Dialer(reactor, links, directory, own_name, settings,
                             request_connection=request_connection)

    @property
    def use_proxy(self) -> bool:
        """Whether peers behind a proxy are reached through its brokering."""
        return self.dialer.use_proxy

    def can_deliver_to(self, address: Address) -> bool:
        """Peers with a server that is not internal and not behind *us* as proxy."""
        if address.operator == self.own_name:
            return False
        settings = self.dialer.server_settings(address.operator)
        return (
            settings is not None
            and not settings.get("internal")
            and settings.get("proxy") != self.own_name
        )

    def deliver(self, request: Request, client_info: ClientInfo,
                address: Address | None = None) -> defer.Deferred[Response | None]:
        """Send the request over a link to the peer, dialling one if none is open."""
        operator = (address or parse_address(request.id)).operator
        d = self.dialer.link_for(operator)
        return d.addCallback(self._call, request)

    def _call(self, link: EPSConnection, request: Request) -> defer.Deferred[Response | None]:
        return inbox.call(self.links, link, request, self.settings["call_timeout"])

    def link_for(self, operator: str) -> defer.Deferred[EPSConnection]:
        """An open, identified link to ``operator``: an existing one, or a new one."""
        return self.dialer.link_for(operator)

    def start(self) -> None:
        """Open the kept links now, then revise them periodically and on change."""
        self.dialer.start()

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """Dial with ``settings`` from now on (see :meth:`Dialer.reconfigure`)."""
        self.dialer.reconfigure(settings)
        self.settings = settings

    def stop(self) -> defer.Deferred[None]:
        """Stop the kept links and their maintenance."""
        return self.dialer.stop()

    def wanted_peers(self) -> dict[str, str]:
        """Peer name -> server address of every peer we keep a link to (SPEC §12.7)."""
        return self.dialer.wanted_peers()

    def maintain(self) -> None:
        """Revise the kept links, and close links we dialled that stayed idle."""
        self.dialer.maintain()

    def keeper_ready(self, name: str) -> defer.Deferred[EPSConnection]:
        """Fires with the kept link to ``name`` once it is up (for tests and start-up)."""
        return self.dialer.keeper_ready(name)
