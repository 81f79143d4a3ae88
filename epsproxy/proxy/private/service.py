"""
The private proxy's service (SPEC §14.5; issue 5): an operator without a public address
receives TLS connections for its announced domains through a public proxy.

:class:`PrivateProxyService` wires the parts and follows the shared start/stop life cycle
(:mod:`epsproxy.net.lifecycle`):

- the JSON-RPC server (:mod:`epsproxy.net.jsonrpc.server`) serving
  :class:`~epsproxy.proxy.private.api.PrivateProxy`, and the client to the own endpoint
  server;
- the forwarder of incoming connections: raw
  (:class:`~epsproxy.proxy.private.forwarding.Forwarder`) or terminating TLS
  (:class:`~epsproxy.proxy.private.terminating.TerminatingForwarder`);
- the announcement table (:class:`epsproxy.proxy.announcements.PrivateAnnouncements`),
  kept in the datastore, and the loop that re-announces it;
- the pool of pre-dialled connections at the public proxies
  (:class:`~epsproxy.proxy.private.pool.PoolKeeper`; ``pool_size`` 0: none).

A reload (SIGHUP) applies the JSON-RPC server's TLS files, rate limits, timeouts, caps
and CORS, a new client to the own endpoint server, the forwarder's limits, address and
TLS files, the re-announce interval and the pool's sizes; what needs a restart is
:data:`PRIVATE_RESTART_KEYS`.  Announcements and forwarded connections are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.net import tls
from epsproxy.net.jsonrpc.client import JSONRPCClient
from epsproxy.net.jsonrpc.server import JSONRPCListener, jsonrpc_site
from epsproxy.net.lifecycle import AsyncStartService, ReloadError
from epsproxy.net.reloading import refuse_restart_changes
from epsproxy.net.metrics import RPCMetrics
from epsproxy.net.reactor import IReactor
from epsproxy.proxy.announcements import PrivateAnnouncements
from epsproxy.proxy.splice_engine import SpliceEngine
from epsproxy.proxy.splice_engine import describe as describe_engine
from epsproxy.proxy.private.api import PrivateProxy
from epsproxy.proxy.private.forwarding import Forwarder
from epsproxy.proxy.private.pool import PoolKeeper
from epsproxy.proxy.private.terminating import TerminatingForwarder
from epsproxy.proxy.reachability import RetiredClients, TrackedClient
from epsproxy.proxy.settings import DEFAULT_PRIVATE_DATASTORE_FILE
from epsproxy.store import Store, open_store

__all__ = ["PRIVATE_RESTART_KEYS", "PrivateProxyPorts", "PrivateProxyService"]

#: Settings of the ``private`` section applied only at start (patterns of
#: :mod:`epsproxy.net.reloading`).
PRIVATE_RESTART_KEYS = (
    "name",
    "splice_engine",
    "datastore",
    "jsonrpc_server.bind_address",
    "jsonrpc_server.path",
    "jsonrpc_server.tls?",
    "internal_endpoint.tls?",
    "internal_endpoint.jsonrpc_client",
    "internal_endpoint.proxy_protocol",
)


class _Collector:
    """Prometheus view of the private proxy's counters."""

    def __init__(self, service: PrivateProxyService) -> None:
        self.service = service

    def collect(self) -> Any:
        proxy = self.service.proxy
        forwarder = self.service.forwarder
        if proxy is None or forwarder is None:
            return
        yield GaugeMetricFamily(
            "private_proxy_announcements", "live announcements",
            value=len(proxy.announcements.announcements()),
        )
        yield GaugeMetricFamily(
            "private_proxy_active_connections", "incoming connections being forwarded",
            value=len(forwarder.active),
        )
        yield CounterMetricFamily(
            "private_proxy_forwarded_connections", "incoming connections forwarded",
            value=forwarder.forwarded,
        )
        yield CounterMetricFamily(
            "private_proxy_failed_connections", "incoming connections that could not be served",
            value=forwarder.failed,
        )
        yield CounterMetricFamily(
            "private_proxy_client_limited_connections",
            "connections refused for max_connections_per_client (by the real client's address)",
            value=forwarder.client_limited,
        )
        yield CounterMetricFamily(
            "private_proxy_reannounce_failures", "re-announcement calls that failed",
            value=proxy.reannounce_failures,
        )
        yield CounterMetricFamily(
            "private_proxy_incoming_calls",
            "incomingConnection calls (connections brokered, not served from the pool)",
            value=proxy.incoming_calls,
        )
        pool = self.service.pool
        if pool is None:
            return
        connections = GaugeMetricFamily(
            "private_proxy_pool_connections",
            "pooled connections kept at each public proxy, by state",
            labels=["proxy", "state"],
        )
        for name, state in pool.state().items():
            for key in ("idle", "connecting"):
                connections.add_metric([name, key], state[key])
        yield connections
        yield CounterMetricFamily(
            "private_proxy_pool_served", "connections served from the pool",
            value=pool.served,
        )
        closed = CounterMetricFamily(
            "private_proxy_pool_closed", "pooled connections closed, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(pool.closed.items()):
            closed.add_metric([reason], count)
        yield closed
        yield CounterMetricFamily(
            "private_proxy_pool_token_failures",
            "requestPoolTokens calls that failed or returned a bad result",
            value=pool.request_failures + pool.bad_results,
        )


@dataclass(frozen=True)
class PrivateProxyPorts:
    """The listener of a started private proxy."""

    jsonrpc: IListeningPort


class PrivateProxyService(AsyncStartService[PrivateProxyPorts]):
    """
    A private proxy: the JSON-RPC server, the client to the own endpoint server, the
    announcement store and the forwarder.  ``settings`` is the validated ``private``
    section.  Like :class:`epsproxy.proxy.public.PublicProxyService`, it starts
    asynchronously (:meth:`when_ready`) and can stop the reactor if it cannot start.
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
        self.store: Store | None = None
        self.client: JSONRPCClient | None = None
        self.listener: JSONRPCListener | None = None
        self._retired = RetiredClients(reactor)
        #: When a round of re-announcing last ended (None: not yet), for the status page.
        self.reannounced_at: float | None = None
        self.forwarder: Forwarder | None = None
        self.proxy: PrivateProxy | None = None
        self.pool: PoolKeeper | None = None
        self.ports: list[IListeningPort] = []
        self._loop: LoopingCall | None = None
        self._reannouncing: Deferred[None] | None = None
        self.registry.register(_Collector(self))

    async def _start(self) -> PrivateProxyPorts:
        settings = self.settings
        default_dir = self.datastore_dir if self.datastore_dir is not None else Path.cwd()
        self.store = await open_store(
            self.reactor, settings["datastore"],
            default_path=default_dir / DEFAULT_PRIVATE_DATASTORE_FILE,
        )
        announcements = PrivateAnnouncements(self.reactor, self.store)
        await announcements.load()
        self.client = TrackedClient(self.reactor, settings["jsonrpc_client"])
        endpoint = settings["internal_endpoint"]
        # Raw TLS is relayed; with a tls block of its own it ends here and HTTP goes on.
        forwarder_type = Forwarder if endpoint.get("tls") is None else TerminatingForwarder
        self.forwarder = forwarder_type(
            self.reactor, endpoint,
            max_connections=settings["max_connections"],
            max_connections_per_client=settings.get("max_connections_per_client"),
            connect_timeout=settings["connect_timeout"],
            idle_timeout=settings["idle_timeout"],
            engine=SpliceEngine.shared(self.reactor) if settings["splice_engine"] else None,
        )
        server_settings = settings["jsonrpc_server"]
        server_tls = server_settings.get("tls")
        verify_caller = server_tls is not None and server_tls["verify_client"]
        if not verify_caller:
            self.log.warn(
                "the JSON-RPC server does not verify client certificates: any caller that "
                "reaches {address} can claim any _client",
                address=server_settings["bind_address"],
            )
        self.pool = PoolKeeper(
            self.reactor, announcements, self.client, self.forwarder,
            **self._pool_settings(settings),
        )
        self.proxy = PrivateProxy(
            self.reactor, settings["name"], announcements, self.client, self.forwarder,
            proxy_protocol=settings["internal_endpoint"]["proxy_protocol"],
            verify_caller=verify_caller,
            call_timeout=settings["jsonrpc_client"]["timeout"],
            pool=self.pool,
        )
        dispatcher = self.proxy.dispatcher()
        site = jsonrpc_site(
            dispatcher, server_settings, reactor=self.reactor,
            metrics=RPCMetrics(self.registry, "private_proxy", dispatcher.__contains__),
        )
        self.listener = JSONRPCListener(self.reactor, site, server_settings,
                                        name="private.jsonrpc_server")
        port = await self.listener.listen()
        self.ports.append(port)
        loop = self._loop = LoopingCall(self._reannounce)
        loop.clock = self.reactor
        loop.start(settings["reannounce_interval"], now=True)
        self.pool.start()
        if self.forwarder.engine is not None:
            self.forwarder.engine.start()
        host = cast(IPv4Address | IPv6Address, port.getHost())  # a TCP listener
        self.log.info(
            "private proxy {name} serving: JSON-RPC on {host}:{port}{path}; incoming "
            "connections {how} {address}; splice engine {engine}",
            name=settings["name"], host=host.host, port=host.port,
            path=server_settings["path"],
            how="terminated and forwarded as HTTP to" if endpoint.get("tls") is not None
            else "relayed as raw TLS to",
            address=endpoint["address"],
            engine=describe_engine(self.forwarder.engine, settings["splice_engine"]),
        )
        return PrivateProxyPorts(port)

    def _reannounce(self) -> Deferred[None]:
        # Never let an error stop the loop for good.
        proxy = self.proxy
        if proxy is None:
            return succeed(None)
        d = self._reannouncing = proxy.reannounce()

        def done(result: Any) -> None:
            self._reannouncing = None
            if isinstance(result, Failure) and not result.check(defer.CancelledError):
                self.log.failure("re-announcing failed", result)
            elif not isinstance(result, Failure):
                self.reannounced_at = self.reactor.seconds()

        return d.addBoth(done)

    def _describe(self) -> str:
        return "private proxy"

    @staticmethod
    def _pool_settings(settings: dict[str, Any]) -> dict[str, Any]:
        return {
            "pool_size": settings["pool_size"], "pool_max": settings["pool_max"],
            "shrink_after": settings["pool_shrink_after"],
            "connect_timeout": settings["connect_timeout"],
            "call_timeout": settings["jsonrpc_client"]["timeout"],
        }

    def pool_state(self) -> dict[str, dict[str, int]] | None:
        """The pool per public proxy (:meth:`PoolKeeper.state`), None without a pool."""
        if self.pool is None or self.settings["pool_size"] == 0:
            return None
        return self.pool.state()

    # -- reload and readiness -------------------------------------------------------------

    def reload(self, settings: dict[str, Any]) -> None:
        """
        Apply ``settings`` (the validated ``private`` section; see the module docstring)
        or raise :class:`ReloadError` naming the keys that need a restart or the file
        that is unusable, having changed nothing.
        """
        refuse_restart_changes(self.settings, settings, PRIVATE_RESTART_KEYS)
        tls.forget_cached()
        endpoint = settings["internal_endpoint"]
        client: JSONRPCClient | None = None
        try:
            where = "internal_endpoint."
            if endpoint.get("tls") is not None:
                tls.server_options(endpoint["tls"])
            where = "jsonrpc_client."
            if self.proxy is not None and settings["jsonrpc_client"] != self.settings["jsonrpc_client"]:
                client = TrackedClient(self.reactor, settings["jsonrpc_client"])
            where = "jsonrpc_server."
            if self.listener is not None:
                self.listener.reconfigure(settings["jsonrpc_server"])  # the last that can fail
        except ValueError as e:
            if client is not None:
                client.close()
            raise ReloadError(f"{where}{e}") from None
        if self.forwarder is not None:
            self.forwarder.reconfigure(
                endpoint, max_connections=settings["max_connections"],
                max_connections_per_client=settings.get("max_connections_per_client"),
                connect_timeout=settings["connect_timeout"],
                idle_timeout=settings["idle_timeout"],
            )
        if self.proxy is not None:
            if client is not None and self.client is not None:
                self._retired.retire(self.client, self.settings["jsonrpc_client"]["timeout"])
                self.proxy.client = self.client = client
            self.proxy.call_timeout = settings["jsonrpc_client"]["timeout"]
        if self.pool is not None:
            self.pool.reconfigure(client=self.client, **self._pool_settings(settings))
        loop = self._loop
        interval = settings["reannounce_interval"]
        if loop is not None and loop.running and loop.interval != interval:
            loop.stop()
            loop.start(interval, now=False)
        self.settings = settings
        self.log.info("private proxy {name} reloaded its settings", name=settings["name"])

    def readiness(self) -> dict[str, str]:
        """
        Start-up and stop (see the base class), then: the JSON-RPC server listening, the
        store open, and the own endpoint server answering (its last call, the periodic
        re-announcement included, got an answer).
        """
        checks = super().readiness()
        if checks:
            return checks
        if not self.ports:
            checks["listener"] = "jsonrpc_server is not listening"
        if self.store is None:
            checks["store"] = "not open"
        client = self.proxy.client if self.proxy is not None else self.client
        reason = getattr(client, "unreachable", None)
        if reason is not None:
            checks["endpoint_server"] = f"the last call got no answer: {reason}"
        return checks

    async def _close(self, grace: float = 0.0) -> None:
        """
        Stop re-announcing and listening, give forwarded connections up to ``grace``
        seconds to end by themselves, then close them, the client and the store.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._reannouncing is not None:
            self._reannouncing.cancel()  # closes its connection to the endpoint server
        if self.pool is not None:
            await self.pool.stop()
        ports, self.ports = self.ports, []
        for port in ports:
            await maybeDeferred(port.stopListening)
        if self.forwarder is not None:
            active = len(self.forwarder.active)
            if active and grace > 0:
                self.log.info("draining {count} forwarded connection(s) for up to {grace:g} s",
                              count=active, grace=grace)
                await self.forwarder.drain(grace)
            await self.forwarder.close()
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()
        await self._retired.close_all()
        self.listener = None
        if self.store is not None:
            store, self.store = self.store, None
            await store.close()

    async def _stop(self) -> None:
        await self._close(self.settings["shutdown_grace"])
