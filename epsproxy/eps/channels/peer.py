"""
The channels that connect an EPS to other EPS servers (SPEC §12.6, §12.7), over our
line-framed mutual-TLS protocol instead of the reference's gRPC:

- :class:`EPSServerChannel` (``eps_server``, alias ``grpc_server``) listens for peers,
  and serves connections handed to it after a proxy rendezvous (``_connectionRequest``);
  it delivers to peers that are connected to us.
- :class:`EPSClientChannel` (``eps_client``, alias ``grpc_client``) dials peers whose
  directory entry names a reachable server, directly or through their proxy's
  peer-to-peer brokering, and keeps links open to the peers that may call us, so a node
  without a reachable server still receives calls.

Better than the reference, on purpose (SPEC §23.2 #14-#17): links are reused for every
call in both directions, many calls in flight at once; calls have a timeout; a broken
peer entry skips that peer only; persistent links reconnect on their own with
exponential backoff and jitter instead of once a minute; a proxied connection is
brokered once and reused while it lives.
"""

from __future__ import annotations

import random
import secrets
from typing import Any, Callable

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.rules import forms

from epsproxy.net import ratelimit, tls
from epsproxy.directory import entries as _entries
from epsproxy.eps.links import wire
from epsproxy.eps.addresses import Address
from epsproxy.eps.broker import Broker, ClientInfo, Request, Response
from epsproxy.eps.links.protocol import EPSConnection
from epsproxy.eps.peering import INCOMING, OUTGOING, PeerLinks
from epsproxy.net.token import TokenError, decode_token, dial_with_token

__all__ = [
    "PeerChannelError",
    "EPS_SERVER_SETTINGS",
    "EPS_CLIENT_SETTINGS",
    "LINK_SETTINGS",
    "EPSServerChannel",
    "EPSClientChannel",
    "link_options",
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

_PROXY_ANSWER = forms.Map(
    {
        "token": forms.Required(forms.String(max_length=200)),
        "endpoint": forms.Required(forms.String(min_length=1, max_length=300)),
    },
    strict=False,
)

_SERVER_TYPES = ("eps_server", "grpc_server")


def link_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The :class:`EPSConnection` options of a channel's validated settings."""
    return {
        "max_line": settings["max_line_bytes"],
        "hello_timeout": settings["hello_timeout"],
        "ping_interval": settings["ping_interval"],
        "dead_after": settings["dead_after"],
    }


class EPSServerChannel:
    """
    The ``eps_server`` channel: a mutual-TLS listener for peers (validated
    :data:`EPS_SERVER_SETTINGS`), and delivery to peers linked to us.

    ``refusals(reason)``, if set before :meth:`start`, counts the peers refused by the
    listener's connections (and by the links served after a rendezvous), with the
    reasons of :data:`epsproxy.eps.links.session.PEER_REFUSAL_REASONS`, ``rate_limited``
    included.
    """

    type = "eps_server"

    def __init__(
        self, name: str, own_name: str, settings: dict[str, Any], links: PeerLinks, reactor: Any
    ) -> None:
        self.name = name
        self.own_name = own_name
        self.settings = settings
        self.links = links
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.refusals: Callable[[str], None] | None = None
        # Fail at start-up, not at the first connection, on unusable TLS settings.
        tls.server_options(settings["tls"])

    def start(self) -> defer.Deferred[IListeningPort]:
        """Listen on ``bind_address``; fires with the port."""
        endpoint = tls.listen_endpoint(self.reactor, self.settings["bind_address"],
                                       self.settings["tls"])
        factory: Any = self.links.server_factory(**self._link_options())
        if self.settings.get("tcp_rate_limits"):
            refusals = self.refusals
            factory = ratelimit.rate_limited(
                factory, self.settings["tcp_rate_limits"], self.reactor,
                on_refused=None if refusals is None else lambda _: refusals("rate_limited"),
            )

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            address = port.getHost()
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

    def stop(self) -> defer.Deferred[None]:
        """Stop listening (open links are closed by their owner, :class:`PeerLinks`)."""
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    def can_deliver_to(self, address: Address) -> bool:
        """Peers (never ourselves) that have a link to us which they opened."""
        return (
            address.operator != self.own_name
            and self.links.link_to(address.operator, INCOMING) is not None
        )

    def deliver(self, request: Request, client_info: ClientInfo) -> defer.Deferred[Response | None]:
        """Send the request over the peer's link; fires with its answer."""
        from epsproxy.eps.addresses import parse_address

        operator = parse_address(request.id).operator
        link = self.links.link_to(operator, INCOMING)
        if link is None:
            return defer.fail(PeerChannelError(f"{operator} is no longer connected"))
        return self.links.call(link, request, self.settings["call_timeout"])

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
        if request["channel"] not in _SERVER_TYPES:
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


class _Keeper:
    """
    A persistent link to one peer: dial, and after every failure or loss dial again
    after a delay from ``policy`` (exponential backoff with jitter).  The attempt count
    resets only when a link stayed up for ``stable_after`` seconds, so a peer that
    refuses us right after the handshake is not hammered.
    """

    def __init__(
        self,
        name: str,
        address: str,
        endpoint: Any,
        factory: Any,
        clock: Any,
        policy: Any,
        stable_after: float = 10.0,
    ) -> None:
        self.name = name
        self.address = address
        self.endpoint = endpoint
        self.factory = factory
        self.clock = clock
        self.policy = policy
        self.stable_after = stable_after
        self.link: EPSConnection | None = None
        self.attempts = 0
        self._stopped = False
        self._timer: Any = None
        self._connecting: defer.Deferred[Any] | None = None
        self._candidate: EPSConnection | None = None
        self._up_since = 0.0
        self._waiters: list[defer.Deferred[EPSConnection]] = []

    def start(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self._timer = None
        self._connecting = self.endpoint.connect(self.factory)
        self._connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, link: EPSConnection) -> None:
        self._connecting = None
        if self._stopped:
            link.close()
            return
        self._candidate = link
        link.when_ready().addCallbacks(lambda _: self._up(link), self._failed)

    def _up(self, link: EPSConnection) -> None:
        self._candidate = None
        if self._stopped:
            link.close()
            return
        self.link = link
        self._up_since = self.clock.seconds()
        link.when_closed().addCallback(self._down)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(link)

    def _down(self, _: Any) -> None:
        lived = self.clock.seconds() - self._up_since
        self.link = None
        if self._stopped:
            return
        if lived >= self.stable_after:
            self.attempts = 0
        log.info("kept link to {peer} lost; reconnecting", peer=self.name)
        self._retry()

    def _failed(self, failure: Any) -> None:
        self._connecting = self._candidate = None
        if self._stopped:
            return
        log.warn("cannot link to {peer} at {address}: {error}", peer=self.name,
                 address=self.address, error=failure.getErrorMessage()[:300])
        self._retry()

    def _retry(self) -> None:
        self.attempts += 1
        delay = self.policy(self.attempts)
        self._timer = self.clock.callLater(delay, self._connect)

    def when_up(self) -> defer.Deferred[EPSConnection]:
        """Fires with the link once it is up (at once if it is)."""
        if self.link is not None and self.link.is_open:
            return defer.succeed(self.link)
        waiter: defer.Deferred[EPSConnection] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def stop(self) -> defer.Deferred[None]:
        """Stop reconnecting and close the link; fires once it is closed."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._connecting is not None:
            self._connecting.cancel()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(PeerChannelError(f"no longer keeping a link to {self.name}"))
        closing = []
        for link in (self._candidate, self.link):
            if link is not None:
                closing.append(link.when_closed())
                link.close()
        return defer.gatherResults(closing).addCallback(lambda _: None)


class EPSClientChannel:
    """
    The ``eps_client`` channel (validated :data:`EPS_CLIENT_SETTINGS`): delivers to
    peers with a reachable server, reusing any open link to them, and keeps links open to
    the peers that may call us (SPEC §12.7 rules).  ``broker`` must be set before the
    first call to a peer behind a proxy (it carries ``requestConnection``).
    """

    type = "eps_client"

    def __init__(
        self,
        name: str,
        own_name: str,
        settings: dict[str, Any],
        links: PeerLinks,
        directory: Any,
        reactor: Any,
        broker: Broker | None = None,
    ) -> None:
        self.name = name
        self.own_name = own_name
        self.settings = settings
        self.links = links
        self.directory = directory
        self.reactor = reactor
        self.broker = broker
        self.use_proxy = settings["use_proxy"] if settings.get("useProxy") is None else (
            settings["useProxy"]
        )
        self._keepers: dict[str, _Keeper] = {}
        self._dialing: dict[str, list[defer.Deferred[EPSConnection]]] = {}
        self._loop: LoopingCall | None = None
        tls.client_options(settings["tls"], own_name)  # unusable TLS settings fail now

    # -- delivery -----------------------------------------------------------------------

    def _server_settings(self, operator: str) -> dict[str, Any] | None:
        try:
            entry = self.directory.entry_for(operator)
        except Exception:
            return None
        server = _entries.channel(entry, "eps_server")
        if server is None:
            return None
        settings = server.get("settings")
        if not isinstance(settings, dict) or not isinstance(settings.get("address"), str):
            return None
        return settings

    def can_deliver_to(self, address: Address) -> bool:
        """Peers with a server that is not internal and not behind *us* as proxy."""
        if address.operator == self.own_name:
            return False
        settings = self._server_settings(address.operator)
        return (
            settings is not None
            and not settings.get("internal")
            and settings.get("proxy") != self.own_name
        )

    def deliver(self, request: Request, client_info: ClientInfo) -> defer.Deferred[Response | None]:
        """Send the request over a link to the peer, dialling one if none is open."""
        from epsproxy.eps.addresses import parse_address

        operator = parse_address(request.id).operator
        d = self.link_for(operator)
        return d.addCallback(self.links.call, request, self.settings["call_timeout"])

    def link_for(self, operator: str) -> defer.Deferred[EPSConnection]:
        """An open, identified link to ``operator``: an existing one, or a new one."""
        link = self.links.link_to(operator)
        if link is not None:
            return defer.succeed(link)
        waiter: defer.Deferred[EPSConnection] = defer.Deferred()
        if operator in self._dialing:
            self._dialing[operator].append(waiter)
            return waiter
        self._dialing[operator] = [waiter]

        def settle(outcome: Any) -> None:
            for d in self._dialing.pop(operator, []):
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    d.callback(outcome)

        defer.ensureDeferred(self._dial(operator)).addBoth(settle)
        return waiter

    async def _dial(self, operator: str) -> EPSConnection:
        settings = self._server_settings(operator)
        if settings is None:
            raise PeerChannelError(f"{operator} has no reachable eps_server in the directory")
        proxy = settings.get("proxy")
        if proxy:
            if not self.use_proxy:
                raise PeerChannelError(
                    "destination is only reachable via proxy but proxying is disabled"
                )
            link = await self._dial_via_proxy(operator, proxy)
        else:
            endpoint = self._endpoint(settings["address"], operator)
            try:
                link = await endpoint.connect(
                    self.links.client_factory(**link_options(self.settings))
                )
            except Exception as e:
                raise PeerChannelError(
                    f"cannot connect to {operator} at {settings['address']}: {e}"
                ) from None
        try:
            await link.when_ready()
        except Exception as e:
            raise PeerChannelError(f"link to {operator} failed: {e}") from None
        if link.peer is None or link.peer.name != operator:
            link.close(wire.ERR_IDENTITY, "not the operator we dialled")
            raise PeerChannelError(
                f"the server at {settings['address']} is not {operator}"
            )
        return link

    def _endpoint(self, address: str, operator: str) -> Any:
        options: dict[str, Any] = {"timeout": self.settings["connect_timeout"]}
        if self.settings.get("proxy_url") is not None:
            options["proxy_url"] = self.settings["proxy_url"]
        return tls.client_endpoint(self.reactor, address, self.settings["tls"], operator,
                                   **options)

    async def _dial_via_proxy(self, operator: str, proxy: str) -> EPSConnection:
        """P2P brokering, client side (SPEC §15 steps 2, 5, 6)."""
        if self.broker is None:
            raise PeerChannelError("no broker to ask the proxy for a connection")
        if proxy == operator:
            raise PeerChannelError(f"{operator} names itself as its proxy")
        method = f"{proxy}.requestConnection"
        request = Request(
            method, {"to": operator, "channel": "eps_server"},
            f"{method}({secrets.token_hex(8)})",
        )
        own = ClientInfo(self.own_name, self.directory.own_entry())
        try:
            response = await self.broker.deliver(request, own)
        except Exception as e:
            raise PeerChannelError(f"cannot ask proxy {proxy} for a connection: {e}") from None
        if response is None:
            raise PeerChannelError(f"proxy {proxy} gave no answer to requestConnection")
        if response.error is not None:
            raise PeerChannelError(
                f"proxy {proxy} refused a connection to {operator}: "
                f"{str(response.error.get('message'))[:300]}"
            )
        try:
            answer = _PROXY_ANSWER.validate(response.result)
            token = decode_token(answer["token"])
        except (forms.FormError, TokenError) as e:
            raise PeerChannelError(f"proxy {proxy} answered nonsense: {e}") from None
        try:
            link = await dial_with_token(
                self.reactor, answer["endpoint"], token, self.settings["tls"],
                self.links.client_factory(**link_options(self.settings)),
                tls_client_for=operator, timeout=self.settings["connect_timeout"],
            )
        except Exception as e:
            raise PeerChannelError(
                f"cannot reach {operator} through proxy {proxy} at {answer['endpoint']}: {e}"
            ) from None
        log.info("link to {peer} brokered by proxy {proxy}", peer=operator, proxy=proxy)
        return link

    # -- persistent links ---------------------------------------------------------------

    def start(self) -> None:
        """Open the persistent links now, then revise them periodically and on change."""
        self._loop = LoopingCall(self.maintain)
        self._loop.clock = self.reactor
        self._loop.start(self.settings["maintenance_interval"], now=True)
        add_listener = getattr(self.directory, "add_listener", None)
        if callable(add_listener):
            add_listener(self.maintain)

    def stop(self) -> defer.Deferred[None]:
        """Stop the persistent links and the maintenance."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        keepers, self._keepers = self._keepers, {}
        stopping = [keeper.stop() for keeper in keepers.values()]
        return defer.gatherResults(stopping, consumeErrors=True).addCallback(lambda _: None)

    def wanted_peers(self) -> dict[str, str]:
        """Peer name -> server address of every peer we keep a link to (SPEC §12.7)."""
        try:
            own = self.directory.own_entry()
            candidates = self.directory.entries({"channels": list(_SERVER_TYPES)})
        except Exception as e:
            log.warn("cannot list peers for persistent links: {error}", error=str(e))
            return {name: k.address for name, k in self._keepers.items()}
        own_server = _entries.channel(own, "eps_server")
        own_settings = (own_server or {}).get("settings") or {}
        reachable = (
            own_server is not None
            and isinstance(own_settings.get("address"), str)
            and not own_settings.get("internal")
            and not own_settings.get("proxy")
        )
        wanted: dict[str, str] = {}
        for peer in _entries.peers(own, candidates, incoming_only=True):
            name = peer.get("name")
            if not isinstance(name, str) or name == self.own_name:
                continue
            if reachable and _entries.channel(peer, "eps_client") is not None:
                continue  # the peer can dial us itself
            settings = (_entries.channel(peer, "eps_server") or {}).get("settings")
            if not isinstance(settings, dict) or not isinstance(settings.get("address"), str):
                log.warn("skipping peer {peer}: its eps_server settings are invalid", peer=name)
                continue
            if settings.get("internal") or settings.get("proxy"):
                continue
            wanted[name] = settings["address"]
        return wanted

    def maintain(self) -> None:
        """Revise the persistent links, and close links we dialled that stayed idle."""
        wanted = self.wanted_peers()
        for name in list(self._keepers):
            keeper = self._keepers[name]
            if wanted.get(name) != keeper.address:
                del self._keepers[name]
                log.info("no longer keeping a link to {peer}", peer=name)
                keeper.stop()
        for name, address in wanted.items():
            if name not in self._keepers:
                self._keepers[name] = self._keep(name, address)
        now = self.reactor.seconds()
        for link in list(self.links.links()):
            if (
                link.direction == OUTGOING  # type: ignore[attr-defined]
                and not getattr(link, "kept", False)
                and now - link.last_used > self.settings["idle_timeout"]  # type: ignore[attr-defined]
            ):
                log.info("closing idle link to {peer}", peer=link.peer.name if link.peer else "?")
                link.close(wire.ERR_SHUTDOWN, "idle")

    def _keep(self, name: str, address: str) -> _Keeper:
        log.info("keeping a link to {peer} at {address}", peer=name, address=address)
        keeper = _Keeper(
            name,
            address,
            self._endpoint(address, name),
            self.links.client_factory(kept=True, **link_options(self.settings)),
            self.reactor,
            backoffPolicy(
                initialDelay=self.settings["reconnect_initial_delay"],
                maxDelay=self.settings["reconnect_max_delay"],
                factor=1.5,
                jitter=random.random,
            ),
        )
        keeper.start()
        return keeper

    def keeper_ready(self, name: str) -> defer.Deferred[EPSConnection]:
        """Fires with the kept link to ``name`` once it is up (for tests and start-up)."""
        keeper = self._keepers.get(name)
        if keeper is None:
            return defer.fail(PeerChannelError(f"no persistent link to {name}"))
        return keeper.when_up()
