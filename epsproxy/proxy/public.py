"""
The public proxy (SPEC §14.1, §14.3, §14.4, §15): it brokers peer-to-peer connections
between endpoint servers that cannot reach each other.

Two parts, wired by :class:`PublicProxyService`:

- :class:`PublicProxy` holds the JSON-RPC methods that the own endpoint server calls.
  ``requestConnection`` makes a token (:meth:`Rendezvous.new_token`), asks the target
  endpoint server (``"<to>._connectionRequest"``, sent through the own endpoint server)
  to present it at the internal endpoint, and answers the caller with the token, which
  it then presents too.
- The internal listener (:meth:`Rendezvous.factory`) pairs the two connections that
  present the same token and splices them; the proxy never sees plaintext, only TLS
  records relayed between the two endpoint servers.

Better than the reference (SPEC §23.1):

- The pending-token table is capped (``max_pending_tokens``; a full table refuses
  ``requestConnection`` with 503), and a token's expiry starts when it is made, not after
  the ``_connectionRequest`` round trip (#5, #6).  A failed round trip forgets the token.
- ``_client`` is trusted only from the own endpoint server (#8): when the JSON-RPC
  server verifies client certificates, a caller whose certificate does not name this
  proxy's operator is refused with 403.  Without verified client certificates a warning
  is logged at start.
- Listeners that cannot bind fail the start, and the internal listener is closed on
  stop (#10).
- Logs never carry tokens, and client addresses only truncated (#11).

Pooled connections (issue 14): ``requestPoolTokens`` hands pool tokens to an operator
with a live announcement here; the private proxy's connections that present them wait
idle in :class:`~epsproxy.proxy.pool.ConnectionPool`, and the SNI front serves a new
client from them before it falls back to brokering.

A reload (SIGHUP) applies the JSON-RPC server's TLS files, rate limits, timeouts, caps
and CORS, a new client to the own endpoint server, the ``tcp_rate_limits`` of the
internal and TLS listeners, the token, splice and ClientHello timeouts and limits, the
pool's cap and idle timeout, and the internal endpoint told to the parties; pending
tokens, splices, pooled connections and announcements are kept.  What needs a restart
is :data:`PUBLIC_RESTART_KEYS`.  (The domains an operator may announce come from its
directory entry, not from the settings: nothing to reload.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.net.lifecycle import AsyncStartService, ReloadError
from epsproxy.net.pages import RecentEvents
from epsproxy.net.reloading import refuse_restart_changes
from epsproxy.rules import forms
from epsproxy.net import admission, ratelimit, tls
from epsproxy.rules.certificates import certificate_names
from epsproxy.rules.text import shorten
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
from epsproxy.net.jsonrpc.server import JSONRPCListener, jsonrpc_site
from epsproxy.net.metrics import RPCMetrics
from epsproxy.net.reactor import IReactor
from epsproxy.net.token import encode_token
from ..store import Store, open_store
from .announcements import (
    ANNOUNCE_CONNECTIONS_PARAMS,
    GET_ANNOUNCEMENTS_PARAMS,
    NOT_AUTHORIZED,
    OPERATOR,
    AnnouncementError,
    PublicAnnouncements,
)
from .pool import CLOSE_REASONS, ConnectionPool
from .pooling import REQUEST_POOL_TOKENS, REQUEST_POOL_TOKENS_PARAMS, keep_alive_socket
from .reachability import RetiredClients, TrackedClient
from .rendezvous_server import Rendezvous, RendezvousFull
from .sni import SNIFront
from .settings import DEFAULT_DATASTORE_FILE
from .splice_engine import SpliceEngine
from .splice_engine import describe as describe_engine

__all__ = [
    "NO_ANNOUNCEMENT",
    "PUBLIC_RESTART_KEYS",
    "SERVER_CHANNELS",
    "TOO_MANY_PENDING",
    "NOT_AUTHORIZED",
    "REQUEST_CONNECTION_PARAMS",
    "PublicProxy",
    "PublicProxyPorts",
    "PublicProxyService",
]

log = Logger()

#: Channel types a ``requestConnection`` may name: the target's server channel.
SERVER_CHANNELS = ("eps_server", "grpc_server")

#: Error code of a ``requestConnection`` refused because the token table is full.
TOO_MANY_PENDING = 503
#: Error code of a ``requestPoolTokens`` from an operator without a live announcement.
NO_ANNOUNCEMENT = 404
# NOT_AUTHORIZED (403, a call that does not come from the own endpoint server) and
# OPERATOR (a name that makes a valid "<to>._connectionRequest" method, SPEC §9.2) are
# shared with the announcements.

CLIENT_INFO = forms.Map(
    {
        "name": forms.Required(forms.String(min_length=1, max_length=253)),
        "entry": forms.Required(forms.AnyMap()),
    }
)
"""``_client`` as the own endpoint server injects it (SPEC §9.3): ``{name, entry}``."""

REQUEST_CONNECTION_PARAMS = forms.Map(
    {
        "to": forms.Required(OPERATOR),
        "channel": forms.Required(forms.String(choices=SERVER_CHANNELS)),
        "_client": forms.Optional(CLIENT_INFO),
    }
)
"""Params of ``requestConnection`` (SPEC §14.4); ``_client`` is checked by the handler."""

#: Settings of the ``public`` section applied only at start (patterns of
#: :mod:`epsproxy.net.reloading`).
PUBLIC_RESTART_KEYS = (
    "name",
    "splice_engine",
    "datastore",
    "tls_bind_address",
    "internal_bind_address",
    "proxy_protocol",
    "jsonrpc_server.bind_address",
    "jsonrpc_server.path",
    "jsonrpc_server.tls?",
)

# Refusals because of a full token table are logged at most this often (seconds).
_FULL_LOG_INTERVAL = 60.0


def _host_port(address: IAddress) -> tuple[str, int | str]:
    """Host and port of a listening address, for logs."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    return str(address), ""


class PublicProxy:
    """
    The JSON-RPC methods of a public proxy named ``name`` (SPEC §14.4).

    ``client`` calls the own endpoint server, which routes ``"<to>._connectionRequest"``
    over the EPS network; ``internal_endpoint`` is the ``host:port`` told to both parties.
    With ``verify_caller`` a call is served only if the caller's (verified) certificate
    names ``name``: the own endpoint server, the only caller that sets ``_client``
    truthfully.  A ``_connectionRequest`` gets at most ``call_timeout`` seconds (and
    never longer than the token lives).
    """

    def __init__(
        self,
        reactor: IReactor,
        name: str,
        rendezvous: Rendezvous,
        client: JSONRPCClient,
        internal_endpoint: str,
        *,
        accept_timeout: float,
        call_timeout: float,
        verify_caller: bool = True,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.rendezvous = rendezvous
        self.client = client
        self.internal_endpoint = internal_endpoint
        self.call_timeout = min(call_timeout, accept_timeout)
        self.verify_caller = verify_caller
        self._full_logged_at: float | None = None
        self._full_unlogged = 0

    def dispatcher(self) -> Dispatcher:
        """A dispatcher serving this proxy's methods."""
        dispatcher = Dispatcher()
        dispatcher.register(
            "requestConnection", REQUEST_CONNECTION_PARAMS, self.request_connection
        )
        return dispatcher

    def _check_caller(self, context: CallContext) -> None:
        if not self.verify_caller:
            return
        certificate = context.peer_certificate
        if certificate is None or self.name not in certificate_names(certificate):
            raise JSONRPCError(
                NOT_AUTHORIZED,
                "not authorized: only the proxy's own endpoint server may call it",
            )

    def request_connection(
        self, params: dict[str, Any], context: CallContext
    ) -> Deferred[dict[str, str]]:
        """
        ``requestConnection {to, channel, _client}``: a token for a connection between
        the caller and ``to``, which has been asked to meet it at the internal endpoint.
        Fires with ``{"token": <base64>, "endpoint": internal_endpoint}``; errors of
        ``to`` are passed through, a full token table gives 503, no answer -32603.
        """
        self._check_caller(context)
        client = params.get("_client")
        if client is None:
            raise JSONRPCError(
                NOT_AUTHORIZED,
                "not authorized: requestConnection needs _client (call through the "
                "endpoint server)",
            )
        to, channel = params["to"], params["channel"]
        if to == self.name:
            raise JSONRPCError(INVALID_PARAMS, "cannot broker a connection to the proxy itself")
        try:
            token = self.rendezvous.new_token()
        except RendezvousFull:
            self._log_full()
            raise JSONRPCError(
                TOO_MANY_PENDING,
                "too many pending connections, try again later",
            ) from None
        return ensureDeferred(self._broker(token, to, channel, client))

    async def _broker(
        self, token: bytes, to: str, channel: str, client: dict[str, Any]
    ) -> dict[str, str]:
        text = encode_token(token)
        caller = shorten(client["name"])
        request = {
            "endpoint": self.internal_endpoint,
            "client": client,
            "channel": channel,
            "token": text,
        }
        try:
            await self.client.call(
                f"{to}._connectionRequest", request, id=random_id(), timeout=self.call_timeout
            )
        except JSONRPCError as e:
            self.rendezvous.cancel(token)
            log.info(
                "{to} refused a connection from {caller}: {message} (code {code})",
                to=shorten(to), caller=caller, message=shorten(e.message), code=e.code,
            )
            raise JSONRPCError(e.code, e.message, e.data) from None
        except TransportError as e:
            self.rendezvous.cancel(token)
            log.warn(
                "cannot ask {to} for a connection from {caller}: {error}",
                to=shorten(to), caller=caller, error=shorten(str(e), 300),
            )
            raise JSONRPCError(
                INTERNAL_ERROR, f"cannot reach {to} through the proxy's endpoint server"
            ) from None
        except BaseException:
            self.rendezvous.cancel(token)
            raise
        log.info(
            "brokering a connection from {caller} to {to} ({channel})",
            caller=caller, to=shorten(to), channel=channel,
        )
        return {"token": text, "endpoint": self.internal_endpoint}

    # -- announcements (SPEC §14.4; issue 5) ---------------------------------------------

    def register_announcements(
        self, dispatcher: Dispatcher, announcements: PublicAnnouncements
    ) -> None:
        """
        Serve ``announceConnections`` and ``getAnnouncements`` from ``announcements``
        (the table the SNI front asks with ``operator_for``) on ``dispatcher``.
        """

        def announce(params: dict[str, Any], context: CallContext) -> Deferred[Any]:
            self._check_caller(context)
            client = params.get("_client")
            if client is None:
                raise JSONRPCError(NOT_AUTHORIZED, "not authorized")

            def refused(failure: Failure) -> Failure:
                failure.trap(AnnouncementError)
                e = failure.value
                assert isinstance(e, AnnouncementError)  # trap re-raised anything else
                return Failure(JSONRPCError(e.code, e.message, e.data))

            return announcements.announce(client, params["connections"]).addErrback(refused)

        def listing(params: dict[str, Any], context: CallContext) -> list[dict[str, Any]]:
            self._check_caller(context)
            return announcements.announcements()

        dispatcher.register("announceConnections", ANNOUNCE_CONNECTIONS_PARAMS, announce)
        dispatcher.register("getAnnouncements", GET_ANNOUNCEMENTS_PARAMS, listing)

    # -- pooled connections (issue 14) -------------------------------------------------

    def register_pool(
        self, dispatcher: Dispatcher, pool: ConnectionPool, announcements: PublicAnnouncements
    ) -> None:
        """
        Serve ``requestPoolTokens`` (:mod:`epsproxy.proxy.pooling`) on ``dispatcher``:
        pool tokens from ``pool`` for a caller (``_client``) that holds a live
        announcement in ``announcements``.
        """

        def request(params: dict[str, Any], context: CallContext) -> dict[str, Any]:
            self._check_caller(context)
            client = params.get("_client")
            operator = client.get("name") if client is not None else None
            if not isinstance(operator, str) or not operator:
                raise JSONRPCError(
                    NOT_AUTHORIZED,
                    f"not authorized: {REQUEST_POOL_TOKENS} needs _client (call through "
                    "the endpoint server)",
                )
            if not announcements.holds_live(operator):
                raise JSONRPCError(
                    NO_ANNOUNCEMENT,
                    f"no live announcement for {shorten(operator)} at this proxy",
                )
            tokens = pool.issue(operator, params["count"])
            return {
                "tokens": [encode_token(token) for token in tokens],
                "endpoint": self.internal_endpoint,
                "expires_in": pool.token_lifetime,
            }

        dispatcher.register(REQUEST_POOL_TOKENS, REQUEST_POOL_TOKENS_PARAMS, request)

    def _log_full(self) -> None:
        now = self.reactor.seconds()
        self._full_unlogged += 1
        if self._full_logged_at is not None and now - self._full_logged_at < _FULL_LOG_INTERVAL:
            return
        log.warn(
            "refused {count} connection request(s): {pending} tokens are pending "
            "(max_pending_tokens)",
            count=self._full_unlogged, pending=self.rendezvous.pending,
        )
        self._full_logged_at = now
        self._full_unlogged = 0


class _RendezvousCollector:
    """Prometheus view of a :class:`Rendezvous`'s gauges and counters."""

    def __init__(self, rendezvous: Rendezvous) -> None:
        self.rendezvous = rendezvous

    def collect(self) -> Iterator[Metric]:
        r = self.rendezvous
        yield GaugeMetricFamily(
            "proxy_pending_tokens", "tokens waiting for their parties", value=r.pending
        )
        yield GaugeMetricFamily(
            "proxy_active_splices", "connection pairs being spliced", value=r.active_splices
        )
        yield GaugeMetricFamily(
            "proxy_engine_splices",
            "connection pairs of proxy_active_splices relayed by the splice engine (C)",
            value=r.engine_splices,
        )
        yield CounterMetricFamily(
            "proxy_pairings", "connection pairs spliced since start", value=r.pairings
        )
        yield CounterMetricFamily(
            "proxy_timeouts", "tokens or parties given up for lack of a partner or token",
            value=r.timeouts,
        )
        yield CounterMetricFamily(
            "proxy_refusals", "token connections refused (unknown, used or expired token)",
            value=r.refused,
        )
        yield CounterMetricFamily(
            "proxy_spliced_bytes", "bytes relayed between spliced connections",
            value=r.bytes_spliced,
        )


class _SNICollector:
    """Prometheus view of the TLS listener's counters."""

    COUNTERS = ("accepted", "routed", "pooled", "notified", "notify_failed", "no_sni",
                "malformed", "timeouts", "no_route", "full", "abandoned", "bad_proxy_header",
                "rate_limited", "untrusted_proxy_source")

    def __init__(self, service: PublicProxyService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        front = self.service.front
        if front is None:
            return
        yield GaugeMetricFamily("proxy_tls_reading_hello",
                                "TLS connections still sending their ClientHello",
                                value=front.reading)
        family = CounterMetricFamily(
            "proxy_tls_connections", "TLS listener connections by outcome", labels=["outcome"]
        )
        for name in self.COUNTERS:
            family.add_metric([name], getattr(front, name, 0))
        yield family


class _PoolCollector:
    """Prometheus view of the connection pool (and the TLS listener's fallbacks)."""

    def __init__(self, service: PublicProxyService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        pool = self.service.pool
        connections = GaugeMetricFamily(
            "proxy_pool_connections", "pooled connections per operator",
            labels=["operator", "state"])
        tokens = GaugeMetricFamily(
            "proxy_pool_tokens", "unexpired pool tokens per operator", labels=["operator"])
        for operator, state in pool.state().items():
            connections.add_metric([operator, "idle"], state["idle"])
            connections.add_metric([operator, "in_use"], state["in_use"])
            tokens.add_metric([operator], state["tokens"])
        yield connections
        yield tokens
        requests = CounterMetricFamily(
            "proxy_pool_requests", "TLS clients that asked the pool for a connection",
            labels=["outcome"])
        requests.add_metric(["hit"], pool.hits)
        requests.add_metric(["miss"], pool.misses)
        yield requests
        front = self.service.front
        yield CounterMetricFamily(
            "proxy_pool_fallbacks", "TLS clients brokered because the pool had none idle",
            value=front.pool_fallbacks if front is not None else 0)
        closed = CounterMetricFamily(
            "proxy_pool_closed", "idle pooled connections closed or lost, by reason",
            labels=["reason"])
        for reason in CLOSE_REASONS:
            closed.add_metric([reason], pool.closed[reason])
        yield closed


@dataclass(frozen=True)
class PublicProxyPorts:
    """The listeners of a started public proxy."""

    internal: IListeningPort
    jsonrpc: IListeningPort
    tls: IListeningPort | None = None


class PublicProxyService(AsyncStartService[PublicProxyPorts]):
    """
    A public proxy: the internal listener (token connections, rate limited by
    ``tcp_rate_limits``) and the JSON-RPC server, with the client to the own endpoint
    server and the datastore.  ``settings`` is the validated ``public`` section.

    Starts asynchronously; :meth:`when_ready` fires with the :class:`PublicProxyPorts`
    once it serves, or fails with the reason it could not start.  With
    ``stop_reactor_on_failure`` a failed start stops the reactor (``twistd -n proxy``
    exits instead of idling).  ``datastore_dir`` holds the default embedded store
    (default: the working folder).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactor,
        settings: dict[str, Any],
        registry: CollectorRegistry | None = None,
        *,
        stop_reactor_on_failure: bool = False,
        datastore_dir: Path | None = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.datastore_dir = datastore_dir
        self._rate_limited = Counter(
            "proxy_internal_rate_limited_connections",
            "token connections closed by tcp_rate_limits", registry=self.registry,
        )
        # The internal endpoint's limiter: only connections that fail count.  One with a
        # live token was brokered by us, and private proxies and endpoint servers send
        # many of those from one address (an attacker's routed SNI connections must not
        # use up their allowance): the rendezvous forgives them.
        # Limiters exist without limits too, so a reload can add some.
        self._internal_limiter = ratelimit.RateLimiter(
            settings["tcp_rate_limits"], reactor,
            on_refused=lambda reason: self._rate_limited.inc(),
        )
        self._front_limiter: ratelimit.RateLimiter | None = None
        # Connection caps (epsproxy.net.admission): at the cap a listener stops accepting.
        # Behind load balancers (proxy_protocol) their addresses carry many clients: no
        # per-address cap for them at accept.
        self._trusted = admission.parse_networks(settings["proxy_protocol_trusted"])
        self.tls_admission = admission.listener_admission(
            "public.tls", settings, prefix="tls_", exempt=self._lb_sources(settings),
            evict_after=settings["hello_timeout_at_cap"], clock=reactor)
        self.internal_admission = admission.listener_admission(
            "public.internal", settings, prefix="internal_",
            evict_after=settings["read_timeout_at_cap"], clock=reactor)
        #: Pooled connections per operator (issue 14).
        self.pool = ConnectionPool(
            reactor, self._holds_live,
            token_lifetime=settings["accept_timeout"],
            max_per_operator=settings["pool_max_per_operator"],
            idle_timeout=settings["pool_idle_timeout"],
            keep_alive=None,  # the internal listener's sockets have it: _listen_internal
        )
        self.rendezvous = Rendezvous(
            reactor,
            accept_timeout=settings["accept_timeout"],
            read_timeout=settings["read_timeout"],
            max_pending=settings["max_pending_tokens"],
            buffer_bytes=settings["splice_buffer_bytes"],
            idle_timeout=settings["idle_timeout"],
            on_valid_token=self._valid_token,
            pool=self.pool,
            engine=SpliceEngine.shared(reactor) if settings["splice_engine"] else None,
        )
        self.registry.register(_RendezvousCollector(self.rendezvous))
        self.registry.register(_PoolCollector(self))
        self.store: Store | None = None
        self.client: JSONRPCClient | None = None
        self.listener: JSONRPCListener | None = None
        self._retired = RetiredClients(reactor)
        self.proxy: PublicProxy | None = None
        #: The last server names the TLS listener had no announcement for (status page).
        self.refused_names = RecentEvents(reactor)
        self.announcements: PublicAnnouncements | None = None
        self.front: SNIFront | None = None
        self.registry.register(_SNICollector(self))
        self.ports: list[IListeningPort] = []

    # -- start ---------------------------------------------------------------------------

    async def _start(self) -> PublicProxyPorts:
        settings = self.settings
        default_dir = self.datastore_dir if self.datastore_dir is not None else Path.cwd()
        self.store = await open_store(
            self.reactor, settings["datastore"], default_path=default_dir / DEFAULT_DATASTORE_FILE
        )
        self.announcements = PublicAnnouncements(self.reactor, self.store, settings["name"])
        await self.announcements.load()
        # Scale-out (issue 6): follow what other instances on the same Redis announce.
        self.announcements.watch()
        self.client = TrackedClient(self.reactor, settings["jsonrpc_client"])
        server_settings = settings["jsonrpc_server"]
        server_tls = server_settings.get("tls")
        verify_caller = server_tls is not None and server_tls["verify_client"]
        if not verify_caller:
            self.log.warn(
                "the JSON-RPC server does not verify client certificates: any caller that "
                "reaches {address} can claim any _client",
                address=server_settings["bind_address"],
            )
        self.proxy = PublicProxy(
            self.reactor, settings["name"], self.rendezvous, self.client,
            settings["internal_endpoint"],
            accept_timeout=settings["accept_timeout"],
            call_timeout=settings["jsonrpc_client"]["timeout"],
            verify_caller=verify_caller,
        )
        internal = await self._listen_internal()
        dispatcher = self.proxy.dispatcher()
        self.proxy.register_announcements(dispatcher, self.announcements)
        self.proxy.register_pool(dispatcher, self.pool, self.announcements)
        site = jsonrpc_site(
            dispatcher, server_settings, reactor=self.reactor,
            metrics=RPCMetrics(self.registry, "proxy", dispatcher.__contains__),
        )
        self.listener = JSONRPCListener(self.reactor, site, server_settings,
                                        name="public.jsonrpc_server")
        jsonrpc = await self.listener.listen()
        self.ports.append(jsonrpc)
        front_port = await self._listen_tls()
        self.pool.start()
        if self.rendezvous.engine is not None:
            self.rendezvous.engine.start()
        ihost, iport = _host_port(internal.getHost())
        jhost, jport = _host_port(jsonrpc.getHost())
        thost, tport = _host_port(front_port.getHost())
        self.log.info(
            "public proxy {name} serving: TLS passthrough on {thost}:{tport}, internal "
            "endpoint on {ihost}:{iport} (told as {endpoint}), JSON-RPC on "
            "{jhost}:{jport}{path}; splice engine {engine}",
            name=settings["name"], thost=thost, tport=tport, ihost=ihost, iport=iport,
            endpoint=settings["internal_endpoint"], jhost=jhost, jport=jport,
            path=server_settings["path"],
            engine=describe_engine(self.rendezvous.engine, settings["splice_engine"]),
        )
        return PublicProxyPorts(internal, jsonrpc, front_port)

    def _incoming_connection(self, operator: str, params: dict[str, Any]) -> Deferred[Any]:
        """Tell the announcing operator a client is waiting (SPEC §14.2 step 5)."""
        assert self.proxy is not None
        client = self.proxy.client
        return client.call(
            f"{operator}.incomingConnection", params, id=random_id(),
            timeout=min(self.settings["accept_timeout"],
                        self.settings["jsonrpc_client"]["timeout"]),
        )

    async def _listen_tls(self) -> IListeningPort:
        """The SNI listener: ClientHello read whole, routed by live announcements."""
        settings = self.settings
        limits = settings["tcp_rate_limits"]
        front = None

        def refused(reason: str) -> None:
            # Closed before the front saw them: counted with its own refusals.
            if front is not None and not settings["proxy_protocol"]:
                front.rate_limited += 1

        limiter = self._front_limiter = ratelimit.RateLimiter(
            limits, self.reactor, on_refused=refused)
        assert self.announcements is not None
        announcements = self.announcements
        self.front = SNIFront(
            self.reactor, self.rendezvous,
            lookup=announcements.operator_for,
            notify=self._incoming_connection,
            max_hello_bytes=settings["max_hello_bytes"],
            hello_timeout=settings["hello_timeout"],
            internal_endpoint=settings["internal_endpoint"],
            proxy_protocol=settings["proxy_protocol"],
            proxy_trusted=self._trusted,
            proxy_untrusted=settings["proxy_protocol_untrusted"],
            on_routed=self.tls_admission.forgive,
            on_no_route=self.refused_names.add,
            # Behind a load balancer the client's address is in the PROXY header: the
            # front applies the limits itself, per real client.
            rate_limiter=limiter if settings["proxy_protocol"] else None,
            pool=self.pool,
        )
        front = self.front
        factory: Any = self.front.factory()
        if not settings["proxy_protocol"]:
            factory = limiter.wrap(factory)
        endpoint = tls.listen_endpoint(self.reactor, settings["tls_bind_address"], None,
                                       admission=self.tls_admission)
        port = await endpoint.listen(factory)
        self.ports.append(port)
        return port

    async def _listen_internal(self) -> IListeningPort:
        factory: Any = self._internal_limiter.wrap(self.rendezvous.factory())
        endpoint = tls.listen_endpoint(self.reactor, self.settings["internal_bind_address"], None,
                                       admission=self.internal_admission)
        port = await endpoint.listen(factory)
        self.ports.append(port)
        # TCP keepalive for idle pooled connections, set once on the listener: each
        # connection it accepts starts with it (Linux), four system calls fewer per
        # pooled connection.  Brokered pairs have it too: a peer gone silently is found
        # after about a minute of silence instead of at the splice's idle timeout.
        sock = getattr(port, "socket", None)
        if sock is not None:
            keep_alive_socket(sock)
        return port

    def _valid_token(self, peer: Any) -> None:
        # Brokered by us: counts neither against its peer's rate limit nor its address's
        # connection cap (a private proxy relays many clients from one address).
        self._internal_limiter.forgive(peer)
        self.internal_admission.forgive(peer)

    def _holds_live(self, operator: str) -> bool:
        announcements = self.announcements
        return announcements is not None and announcements.holds_live(operator)

    def pool_state(self) -> dict[str, dict[str, int]]:
        """The connection pool per operator (status page): idle, in use, tokens."""
        return self.pool.state()

    def _lb_sources(self, settings: dict[str, Any]) -> tuple[Any, ...]:
        return self._trusted if settings["proxy_protocol"] else ()

    def _describe(self) -> str:
        return "public proxy"

    # -- reload and readiness -------------------------------------------------------------

    def reload(self, settings: dict[str, Any]) -> None:
        """
        Apply ``settings`` (the validated ``public`` section; see the module docstring)
        or raise :class:`ReloadError` naming the keys that need a restart or the file
        that is unusable, having changed nothing.
        """
        refuse_restart_changes(self.settings, settings, PUBLIC_RESTART_KEYS)
        tls.forget_cached()
        client: JSONRPCClient | None = None
        where = "tcp_rate_limits"
        try:
            limits = ratelimit.TCP_RATE_LIMITS(list(settings["tcp_rate_limits"]))
            where = "proxy_protocol_trusted"
            trusted = admission.parse_networks(settings["proxy_protocol_trusted"])
            where = "jsonrpc_client."
            if self.proxy is not None and settings["jsonrpc_client"] != self.settings["jsonrpc_client"]:
                client = TrackedClient(self.reactor, settings["jsonrpc_client"])
            where = "jsonrpc_server."
            if self.listener is not None:
                self.listener.reconfigure(settings["jsonrpc_server"])  # the last that can fail
        except (ValueError, forms.FormError) as e:
            if client is not None:
                client.close()
            raise ReloadError(f"{where}{e}") from None
        self._internal_limiter.reconfigure(limits)
        self._trusted = trusted
        self.tls_admission.reconfigure(
            settings.get("tls_max_connections"), settings.get("tls_max_connections_per_address"),
            exempt=self._lb_sources(settings), evict_after=settings["hello_timeout_at_cap"])
        self.internal_admission.reconfigure(
            settings.get("internal_max_connections"),
            settings.get("internal_max_connections_per_address"),
            evict_after=settings["read_timeout_at_cap"])
        if self._front_limiter is not None:
            self._front_limiter.reconfigure(limits)
        r = self.rendezvous
        r.accept_timeout, r.read_timeout = settings["accept_timeout"], settings["read_timeout"]
        r.max_pending, r.buffer_bytes = settings["max_pending_tokens"], settings["splice_buffer_bytes"]
        r.idle_timeout = settings["idle_timeout"]
        self.pool.token_lifetime = settings["accept_timeout"]
        self.pool.max_per_operator = settings["pool_max_per_operator"]
        self.pool.idle_timeout = settings["pool_idle_timeout"]
        if self.front is not None:
            self.front.max_hello_bytes = settings["max_hello_bytes"]
            self.front.hello_timeout = settings["hello_timeout"]
            self.front.internal_endpoint = settings["internal_endpoint"]
            self.front.proxy_trusted = trusted
            self.front.proxy_untrusted = settings["proxy_protocol_untrusted"]
        if self.proxy is not None:
            if client is not None and self.client is not None:
                self._retired.retire(self.client, self.settings["jsonrpc_client"]["timeout"])
                self.proxy.client = self.client = client
            self.proxy.internal_endpoint = settings["internal_endpoint"]
            self.proxy.call_timeout = min(settings["jsonrpc_client"]["timeout"],
                                          settings["accept_timeout"])
        self.settings = settings
        self.log.info("public proxy {name} reloaded its settings", name=settings["name"])

    def readiness(self) -> dict[str, str]:
        """
        Start-up and stop (see the base class), then: the three listeners bound, the
        store open, and the own endpoint server answering (its last call got an answer;
        no call yet counts as answering).
        """
        checks = super().readiness()
        if checks:
            return checks
        if len(self.ports) < 3:
            checks["listeners"] = f"{3 - len(self.ports)} of 3 listeners not bound"
        if self.store is None:
            checks["store"] = "not open"
        client = self.proxy.client if self.proxy is not None else self.client
        reason = getattr(client, "unreachable", None)
        if reason is not None:
            checks["endpoint_server"] = f"the last call got no answer: {reason}"
        return checks

    # -- stop ----------------------------------------------------------------------------

    async def _close(self, grace: float = 0.0) -> None:
        """
        Stop listening, give spliced pairs up to ``grace`` seconds to end by themselves,
        then close the parties and splices, the client and the store.
        """
        ports, self.ports = self.ports, []
        for port in ports:
            await maybeDeferred(port.stopListening)
        if self.front is not None:
            await self.front.close_all()
        await self.pool.close_all()
        active = self.rendezvous.active_splices
        if active and grace > 0:
            self.log.info("draining {count} spliced connection(s) for up to {grace:g} s",
                          count=active, grace=grace)
            await self.rendezvous.drain(grace)
            if self.rendezvous.active_splices:
                self.log.info("closing {count} spliced connection(s) still open after the "
                              "grace period", count=self.rendezvous.active_splices)
        await self.rendezvous.close_all()
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()
        await self._retired.close_all()
        self.listener = None
        if self.announcements is not None:
            await self.announcements.stop()  # scale-out watcher (issue 6)
        if self.store is not None:
            store, self.store = self.store, None
            await store.close()

    async def _stop(self) -> None:
        await self._close(self.settings["shutdown_grace"])
