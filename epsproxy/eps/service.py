"""
The running endpoint server: directory, channels, broker and peer links wired together
(SPEC §7-§13), started and stopped as one ``twisted.application`` service.

A reload (:meth:`EndpointServerService.reload`, on SIGHUP) applies new TLS files, rate
limits, timeouts, link options, CORS and body caps of the ``eps_server``, ``eps_client``
and ``jsonrpc_server`` channels and the SD client of an ``api`` directory; live links,
pending calls and kept links stay.  What needs a restart is :data:`RESTART_KEYS`, and
any change to a local channel (``jsonrpc_client``, ``stdout``).  The ``signing`` block
is read by the ``eps`` command each time it runs, never by the running server.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import IO, Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.internet import defer
from twisted.logger import Logger

from epsproxy.net import tls
from epsproxy.rules.certificates import load_certificates_file, load_private_key_file, to_pem
from epsproxy.net.lifecycle import AsyncStartService, ReloadError
from epsproxy.net.reloading import refuse_restart_changes
from epsproxy.net.metrics import http_refusals_counter
from epsproxy.net.pages import RecentEvents
from epsproxy.net.reactor import IReactor
from epsproxy import __version__
from epsproxy.directory import entries as _entries
from epsproxy.directory.api import APIDirectory
from epsproxy.directory.jsondir import JSONDirectory
from epsproxy.eps.asynccalls import AsyncCalls
from epsproxy.eps.asyncrpc import is_acknowledgement
from epsproxy.eps.broker import Broker, Channel, Closable, Response, Startable
from epsproxy.eps.channels.gateway import JSONRPCServerChannel
from epsproxy.eps.channels.local import JSONRPCClientChannel, StdoutChannel
from epsproxy.eps.channels.peer import EPSClientChannel, EPSServerChannel
from epsproxy.eps.gossip import Gossip
from epsproxy.eps.inbox import Inbox, request_connection, send_result
from epsproxy.eps.links.dialer import RequestConnection
from epsproxy.eps.links.registry import INCOMING, OUTGOING, LinkRegistry
from epsproxy.eps.links.session import PEER_REFUSAL_REASONS
from epsproxy.eps.settings import GOSSIP_SETTINGS

__all__ = ["EndpointServerService", "RESTART_KEYS"]

#: Settings an endpoint server applies only at start (patterns of
#: :mod:`epsproxy.net.reloading`); a local channel's settings too (:data:`_RELOADING`).
RESTART_KEYS = (
    "name",
    "metrics",
    "directory.type",
    "directory.settings.path",
    "directory.settings.endpoints",
    "directory.settings.ca_certificate_files",
    "directory.settings.ca_intermediate_certificate_files",
    "directory.settings.cache_file",
    "directory.settings.checkpoints",
    "directory.settings.checkpoint_signers",
    "directory.settings.witnesses",
    "gossip",
    "channels[*]?",
    "channels[*].type",
    "channels[*].settings.bind_address",
    "channels[*].settings.path",
    "channels[*].settings.tls?",
)

#: Channel types whose settings reload; any change to another channel needs a restart.
_RELOADING = ("eps_server", "grpc_server", "eps_client", "grpc_client", "jsonrpc_server")

log = Logger()

_INTERNAL = ("_ping", "_directory", "_connectionRequest", "_checkpoint", "respond")
_LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5, 10, 60,
)


#: Metric label -> counter attribute of :class:`AsyncCalls`.
_ASYNC_EVENTS = {
    "acknowledged": "acknowledged_count",
    "expected": "expected_count",
    "responded": "responded",
    "sent": "sent",
    "send_failed": "send_failed",
    "delivered": "delivered",
    "push_failed": "push_failed",
    "dropped": "dropped",
    "expired": "expired",
    "evicted": "evicted",
    "refused": "refused",
}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _counter(calls: AsyncCalls | None, attribute: str) -> float:
    return _number(getattr(calls, attribute, 0))


class EndpointServerService(AsyncStartService["EndpointServerService"]):
    """
    One operator's EPS, from validated ``EPS_SETTINGS``.  :meth:`when_ready` fires with
    the service once every listener is up (or fails with the reason start-up failed;
    with ``stop_reactor_on_failure`` the reactor is then stopped so ``twistd`` exits).
    ``stdout`` replaces ``sys.stdout`` for the ``stdout`` channel (tests).
    """

    def __init__(
        self,
        reactor: IReactor,
        settings: dict[str, Any],
        registry: CollectorRegistry | None = None,
        stop_reactor_on_failure: bool = False,
        stdout: IO[str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.name: str = settings["name"]
        self.registry = registry or CollectorRegistry()
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.stdout = stdout
        self.directory: JSONDirectory | APIDirectory | None = None
        self.links: LinkRegistry | None = None
        self.broker: Broker | None = None
        self.async_calls: AsyncCalls | None = None
        self.gossip: Gossip | None = None
        self.channels: list[Any] = []
        self._known_methods: frozenset[str] = frozenset(_INTERNAL)
        self._http_refusal: Callable[[str], None] | None = None
        self._peer_refusal: Callable[[str], None] | None = None
        #: The last calls the broker did not answer ok (outcome, method), for the status page.
        self.recent_failures = RecentEvents(reactor)

    # -- life cycle ---------------------------------------------------------------------

    async def _start(self) -> EndpointServerService:
        await self._open_directory()
        self._count_refusals()
        # The wiring, in dependency order.  The broker needs the channels, and the links,
        # the gateway and the dialer need the broker: they get the inbox, which the
        # broker opens once it exists.  The asynchronous calls push results through the
        # first local channel, so that one is built before them.
        inbox = Inbox()
        self.links = LinkRegistry(self.reactor, self._opened_directory, self.name, inbox.serve)
        configs = self.settings["channels"]
        local = {i: self._local_channel(c) for i, c in enumerate(configs)
                 if _entries.canonical_channel_type(c["type"]) == "jsonrpc_client"}
        first_local = next(iter(local.values()), None)
        self.async_calls = AsyncCalls(
            self.reactor, self.name, send_result=partial(send_result, self.links),
            push=None if first_local is None else first_local.push,
        )
        ask = request_connection(inbox, self.name, self._opened_directory.own_entry)
        self.channels = [
            local[i] if i in local else self._build_channel(c, inbox, ask)
            for i, c in enumerate(configs)
        ]
        self._warn_about_order()
        self._register_metrics()
        self.gossip = self._build_gossip(inbox)
        self.broker = Broker(
            self._opened_directory, self.channels, self.reactor, version=__version__,
            observe=self._observe, on_answer=self._on_answer,
            checkpoints=None if self.gossip is None else self.gossip.receive,
        )
        inbox.open(self.broker, self.async_calls)
        for channel in self.channels:
            if isinstance(channel, Startable):
                await defer.maybeDeferred(channel.start)
        self._refresh_known_methods()
        if self.gossip is not None:
            self.gossip.start()
        add_listener = getattr(self.directory, "add_listener", None)
        if callable(add_listener):
            add_listener(self._refresh_known_methods)
        log.info("endpoint server {name} ready with channels {channels}", name=self.name,
                 channels=", ".join(f"{c.name} ({c.type})" for c in self.channels))
        return self

    def _witness_key(self, settings: dict[str, Any]) -> tuple[Any, str] | None:
        """(key, certificate PEM) of the ``signing`` block when this node cosigns."""
        witnesses = settings.get("witnesses") or {}
        signing = self.settings.get("signing")
        if not witnesses.get("cosign"):
            return None
        if signing is None:
            raise ValueError("directory.settings.witnesses.cosign needs a signing block "
                             "(the key that cosigns)")
        certificate = load_certificates_file(signing["certificate_file"])[0]
        return load_private_key_file(signing["key_file"]), to_pem(certificate)

    def _build_gossip(self, inbox: Inbox) -> Gossip | None:
        """Checkpoint gossip over the open links (api directories only)."""
        directory = self.directory
        settings = self.settings.get("gossip") or GOSSIP_SETTINGS.validate({})
        if not isinstance(directory, APIDirectory) or not settings["enabled"]:
            return None
        evidence = settings.get("evidence_dir")
        if evidence is None and directory.cache_file is not None:
            evidence = str(directory.cache_file.parent / "evidence")
        links = self.links
        assert links is not None
        return Gossip(
            self.reactor, directory, self.name, inbox.deliver,
            lambda: [name for name, (open_, _) in links.peers().items() if open_],
            None if evidence is None else Path(evidence), settings["interval"],
            registry=self.registry,
        )

    @property
    def _opened_directory(self) -> JSONDirectory | APIDirectory:
        """The directory, opened by :meth:`_open_directory` before anything uses it."""
        if self.directory is None:
            raise RuntimeError("the directory is not open")
        return self.directory

    async def _open_directory(self) -> None:
        directory = self.settings["directory"]
        if directory["type"] == "json":
            self.directory = JSONDirectory(
                directory["settings"]["path"], self.name,
                reload_interval=directory["settings"]["reload_interval"],
            )
        else:
            self.directory = APIDirectory(self.reactor, directory["settings"], self.name,
                                          registry=self.registry,
                                          witness=self._witness_key(directory["settings"]))
            await self.directory.start()
        try:
            self.directory.own_entry()
        except Exception as e:
            log.warn("the directory has no entry for {name} yet ({error}); peers cannot "
                     "identify or call this node until it has", name=self.name, error=str(e))

    def _build_channel(
        self, config: dict[str, Any], inbox: Inbox, ask: RequestConnection
    ) -> Channel:
        kind = _entries.canonical_channel_type(config["type"])
        name, settings = config["name"], config["settings"]
        assert self.links is not None
        if kind == "grpc_server":
            return EPSServerChannel(name, self.name, settings, self.links, self.reactor,
                                    refusals=self._peer_refusal)
        if kind == "grpc_client":
            return EPSClientChannel(name, self.name, settings, self.links,
                                    self._opened_directory, self.reactor,
                                    request_connection=ask)
        if kind == "jsonrpc_server":
            return JSONRPCServerChannel(name, self.name, settings, inbox,
                                        self._opened_directory, self.reactor,
                                        async_calls=self.async_calls,
                                        refusals=self._http_refusal)
        if kind == "stdout":
            return StdoutChannel(name, self.name, self.stdout)
        raise ValueError(f"unknown channel type {config['type']!r}")

    def _local_channel(self, config: dict[str, Any]) -> JSONRPCClientChannel:
        settings = config["settings"]
        services = settings.get("services")
        client_settings = {k: v for k, v in settings.items() if k != "services"}
        return JSONRPCClientChannel(
            config["name"], self.name, client_settings, self.reactor,
            services=frozenset(services) if services else None,
            directory=self.directory,
        )

    def _warn_about_order(self) -> None:
        kinds = [c.type for c in self.channels]
        if "stdout" in kinds and "jsonrpc_client" in kinds and (
            kinds.index("stdout") < kinds.index("jsonrpc_client")
        ):
            log.warn("channel order: stdout comes before jsonrpc_client, so requests for "
                     "{name} are printed and never reach the local service", name=self.name)

    def _describe(self) -> str:
        return f"endpoint server {self.name}"

    async def _close(self) -> None:
        if self.gossip is not None:
            self.gossip.stop()
        # Listeners and kept links stop first, then the links close, then the pools.
        for channel in reversed(self.channels):
            try:
                if isinstance(channel, Startable):
                    await defer.maybeDeferred(channel.stop)
                elif isinstance(channel, Closable):
                    await defer.maybeDeferred(channel.close)
            except Exception:
                log.failure("channel {channel} did not stop cleanly", channel=channel.name)
        if self.links is not None:
            await self.links.close_all()
        for channel in self.channels:
            if isinstance(channel, Startable) and isinstance(channel, Closable):
                await defer.maybeDeferred(channel.close)
        self.channels = []
        if isinstance(self.directory, APIDirectory):
            await self.directory.stop()
        self.directory = None

    # -- reload and readiness -----------------------------------------------------------

    def reload(self, settings: dict[str, Any]) -> None:
        """
        Apply ``settings`` (validated ``EPS_SETTINGS``) to the running server (see the
        module docstring), or raise :class:`ReloadError` naming the keys that need a
        restart or the file that is unusable, having changed nothing.
        """
        restart = list(RESTART_KEYS) + [
            f"channels[{c['name']}].settings" for c in self.settings["channels"]
            if _entries.canonical_channel_type(c["type"]) not in _RELOADING
        ]
        refuse_restart_changes(self.settings, settings, restart)
        tls.forget_cached()
        configs = {c["name"]: c for c in settings["channels"]}
        directory = settings["directory"]
        # Everything that can fail is checked before anything changes.
        where = "directory.settings.jsonrpc_client."
        try:
            for name, config in configs.items():
                block = config["settings"].get("tls")
                kind = _entries.canonical_channel_type(config["type"])
                if block is None or kind not in _RELOADING:
                    continue
                where = f"channels[{name}].settings."
                if kind in ("eps_client", "grpc_client"):
                    tls.client_options(block, self.name)
                else:
                    tls.server_options(block)
            if directory["type"] == "api":
                where = "directory.settings.jsonrpc_client."
                tls.client_options(directory["settings"]["jsonrpc_client"]["tls"], self.name)
        except tls.TLSSettingsError as e:
            raise ReloadError(f"{where}{e}") from None
        for channel in self.channels:
            config = configs[channel.name]
            reconfigure = getattr(channel, "reconfigure", None)
            # Also with unchanged settings: files at the same paths may have been rotated.
            if callable(reconfigure):
                try:
                    reconfigure(config["settings"])
                except ValueError as e:
                    raise ReloadError(f"channels[{channel.name}].settings.{e}") from None
        if isinstance(self.directory, APIDirectory):
            self.directory.reconfigure(directory["settings"]).addErrback(
                lambda f: log.warn("closing the previous SD clients failed: {reason}",
                                   reason=f.getErrorMessage()))
        elif isinstance(self.directory, JSONDirectory):
            self.directory.reload_interval = directory["settings"]["reload_interval"]
        self.settings = settings
        log.info("endpoint server {name} reloaded its settings", name=self.name)

    def readiness(self) -> dict[str, str]:
        """
        Start-up and stop (see the base class), then: every listener bound, and the
        directory loaded, holding this node's entry, and (``api``) updated from the SD
        within :meth:`APIDirectory.stale_after` seconds.
        """
        checks = super().readiness()
        if checks:
            return checks
        for channel in self.channels:
            if isinstance(channel, (EPSServerChannel, JSONRPCServerChannel)) and (
                channel.port is None
            ):
                checks[f"listener {channel.name}"] = "not listening"
        directory = self.directory
        if directory is None:
            checks["directory"] = "not loaded"
            return checks
        if isinstance(directory, APIDirectory):
            limit = directory.stale_after()
            if directory.last_success is None:
                checks["directory"] = "no successful update from the SD yet"
            elif (age := self.reactor.seconds() - directory.last_success) > limit:
                checks["directory"] = (
                    f"stale: no successful update from the SD for {age:.0f} s"
                    f" (limit {limit:g} s)")
            if directory.refusal is not None:
                checks["checkpoint"] = f"degraded: refused the SD's view: {directory.refusal}"
            if self.gossip is not None and self.gossip.alarm is not None:
                checks["gossip"] = self.gossip.alarm
            if "directory" in checks:
                return checks
        try:
            directory.own_entry()
        except Exception as e:
            checks["directory"] = f"no entry for {self.name}: {e}"
        return checks

    # -- asynchronous calls -------------------------------------------------------------

    def _on_answer(self, channel: Channel, caller: str, request_id: str, response: Response) -> None:
        """A local service acknowledged a call: it may ``respond`` later (SPEC §13)."""
        if (
            self.async_calls is not None
            and channel.type == "jsonrpc_client"
            and is_acknowledgement(response)
        ):
            self.async_calls.acknowledged(caller, request_id)

    # -- metrics ------------------------------------------------------------------------

    def _count_refusals(self) -> None:
        """The refusal counters, which the listening channels get when they are built."""
        http_refusals = http_refusals_counter(self.registry, "eps")
        peer_refusals = Counter(
            "eps_peer_refusals", "EPS peer connections refused, by reason",
            ["reason"], registry=self.registry,
        )
        for reason in PEER_REFUSAL_REASONS:
            peer_refusals.labels(reason)
        self._http_refusal = lambda reason: http_refusals.labels(reason).inc()
        self._peer_refusal = lambda reason: peer_refusals.labels(reason).inc()

    def _register_metrics(self) -> None:
        registry = self.registry
        self._requests = Counter(
            "eps_requests", "requests handled by the broker, by method and outcome",
            ["method", "outcome"], registry=registry,
        )
        self._latency = Histogram(
            "eps_request_seconds", "time from receiving a request to its answer",
            ["outcome"], registry=registry, buckets=_LATENCY_BUCKETS,
        )
        links = self.links
        assert links is not None
        peer_links = Gauge("eps_peer_links", "open links to other EPS servers",
                           ["direction"], registry=registry)
        for direction in (INCOMING, OUTGOING):
            peer_links.labels(direction).set_function(partial(links.count, direction))
        registry.register(links.collector())
        Gauge(
            "eps_directory_age_seconds",
            "seconds since the directory was last updated from the SD (-1: never)",
            registry=registry,
        ).set_function(self._directory_age)
        Gauge("eps_directory_entries", "operators in the directory",
              registry=registry).set_function(self._directory_size)
        calls = self.async_calls
        events = Gauge("eps_async_calls", "asynchronous calls by event (since start)",
                       ["event"], registry=registry)
        for event, attribute in _ASYNC_EVENTS.items():
            events.labels(event).set_function(partial(_counter, calls, attribute))
        pending = Gauge("eps_async_pending", "asynchronous calls waiting for a result",
                        ["side"], registry=registry)
        pending.labels("callee").set_function(
            lambda: _number(getattr(calls, "pending_acknowledged", 0)))
        pending.labels("caller").set_function(
            lambda: _number(getattr(calls, "pending_expected", 0)))

    def _directory_age(self) -> float:
        last = getattr(self.directory, "last_success", None)
        if not isinstance(self.directory, APIDirectory):
            return 0.0
        return -1.0 if last is None else self.reactor.seconds() - last

    def _directory_size(self) -> float:
        try:
            return float(len(self._opened_directory.entries()))
        except Exception:
            return 0.0

    def _refresh_known_methods(self) -> None:
        """Method names that may become metric labels: those the directory lists."""
        known = set(_INTERNAL)
        try:
            for entry in self._opened_directory.entries():
                for service in entry.get("services") or ():
                    for method in service.get("methods") or ():
                        if isinstance(method.get("name"), str):
                            known.add(method["name"][:100])
        except Exception:
            return
        self._known_methods = frozenset(known)

    def _observe(self, method: str, outcome: str, seconds: float) -> None:
        label = method if method in self._known_methods else "other"
        self._requests.labels(label, outcome).inc()
        self._latency.labels(outcome).observe(seconds)
        if outcome != "ok":
            self.recent_failures.add(outcome, method)
