"""
The running SD: opens the store, loads and verifies the records, serves JSON-RPC.

On a reload (SIGHUP) the JSON-RPC server's TLS files, rate limits, timeouts, body cap and
CORS, and the refresh interval change live; the listen address and path, the datastore,
the CA files that verify records and the metrics listener need a restart
(:data:`RESTART_KEYS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.net import tls
from epsproxy.net.lifecycle import AsyncStartService, ReloadError
from epsproxy.net.jsonrpc.server import JSONRPCListener, jsonrpc_site
from epsproxy.net.reloading import refuse_restart_changes
from epsproxy.net.metrics import RPCMetrics
from epsproxy.net.reactor import IReactor
from epsproxy.rules.records import TrustStore, timestamp_ns
from ..store import Store, open_store
from .api import sd_dispatcher
from .checkpoints import CheckpointSigner
from .directory import ServiceDirectory

if TYPE_CHECKING:
    from ..store.redis_pubsub import StoreWatcher

__all__ = ["RESTART_KEYS", "ServiceDirectoryService"]

#: Settings an SD applies only at start (patterns of :mod:`epsproxy.net.reloading`).
RESTART_KEYS = (
    "jsonrpc_server.bind_address",
    "jsonrpc_server.path",
    "jsonrpc_server.tls?",
    "directory.datastore",
    "directory.ca_certificate_files",
    "directory.ca_intermediate_certificate_files",
    "metrics",
    "checkpoint",
)


class ServiceDirectoryService(AsyncStartService[IListeningPort]):
    """
    Starts the SD asynchronously; :meth:`when_ready` fires with the listening port once
    it serves (or fails with the reason it could not start).

    If start-up fails (store unreachable, port taken) the failure is logged with its
    reason, and with ``stop_reactor_on_failure`` the reactor is stopped, so
    ``twistd -n sd`` exits instead of idling.
    """

    log = Logger()

    def __init__(
        self, reactor: IReactor, settings: dict, trust: TrustStore,
        registry: CollectorRegistry | None = None,
        stop_reactor_on_failure: bool = False,
    ) -> None:
        self.reactor = reactor
        self.stop_reactor_on_failure = stop_reactor_on_failure
        self.registry = registry or CollectorRegistry()
        self.settings = settings
        self.trust = trust
        self.directory: ServiceDirectory | None = None
        self.port: IListeningPort | None = None
        self.store: Store | None = None
        self._refresher: LoopingCall | None = None
        self.listener: JSONRPCListener | None = None
        #: Why the store did not answer the last read (None: it did), kept by the reads
        #: the SD makes anyway, so a readiness probe costs no I/O.
        self._store_error: str | None = "not open"
        #: Follows appends of other SD instances (a StoreWatcher; Redis store only).
        self.watcher: StoreWatcher | None = None

    async def _start(self) -> IListeningPort:
        directory_settings = self.settings["directory"]
        self.store = await open_store(self.reactor, directory_settings["datastore"])
        checkpoint = self.settings.get("checkpoint")
        signer = None if checkpoint is None else (
            CheckpointSigner.from_settings(checkpoint, self.reactor.seconds))
        self.directory = ServiceDirectory(self.store, self.trust, signer)
        await self.directory.refresh()
        self._store_error = None
        records = len(self.directory.record_log.selected.records)
        server_settings = self.settings["jsonrpc_server"]
        dispatcher = sd_dispatcher(self.directory)
        self._register_metrics()
        site = jsonrpc_site(
            dispatcher, server_settings, reactor=self.reactor,
            metrics=RPCMetrics(self.registry, "sd", dispatcher.__contains__),
        )
        self.listener = JSONRPCListener(self.reactor, site, server_settings,
                                        name="jsonrpc_server")
        self.port = await self.listener.listen()
        self._refresher = LoopingCall(self._refresh)
        self._refresher.clock = self.reactor
        self._refresher.start(directory_settings["refresh_interval"], now=False)
        # Scale-out (issue 6): with a store that can notify (Redis), read what other SD
        # instances append as soon as they append it; the loop above stays the safety net.
        watch = getattr(self.store, "watch", None)
        if watch is not None:
            self.watcher = watch(self._refresh, interval=None)
        address = self.port.getHost()
        assert isinstance(address, (IPv4Address, IPv6Address))  # listen_jsonrpc is TCP
        self.log.info(
            "service directory serving {records} verified record(s) at {host}:{port}{path}",
            records=records,
            host=address.host,
            port=address.port,
            path=server_settings["path"],
        )
        return self.port

    def _register_metrics(self) -> None:
        directory = self.directory
        assert directory is not None
        Gauge(
            "sd_records", "records in the selected chain", registry=self.registry
        ).set_function(lambda: len(directory.record_log.selected.records))
        Gauge(
            "sd_entries", "operators in the directory", registry=self.registry
        ).set_function(lambda: len(directory.record_log.selected.entries))
        Gauge(
            "sd_newest_record_age_seconds",
            "seconds since the created_at time of the newest record (-1: no record)",
            registry=self.registry,
        ).set_function(self._newest_record_age)

    def _newest_record_age(self) -> float:
        directory = self.directory
        tip = None if directory is None else directory.record_log.selected.tip
        if tip is None:
            return -1.0
        try:
            created = timestamp_ns(tip["record"]["created_at"]) / 1e9
        except (KeyError, TypeError, ValueError):
            return -1.0
        return self.reactor.seconds() - created

    # -- reload and readiness -------------------------------------------------------------

    def reload(self, settings: dict[str, Any]) -> None:
        """
        Apply ``settings`` (validated ``SD_SETTINGS``): the JSON-RPC server's TLS files,
        rate limits, timeouts, body cap and CORS, and the refresh interval.  Raises
        :class:`ReloadError` naming the keys that need a restart (:data:`RESTART_KEYS`)
        or the file that is unusable, having changed nothing.
        """
        refuse_restart_changes(self.settings, settings, RESTART_KEYS)
        tls.forget_cached()
        if self.listener is not None:
            try:
                self.listener.reconfigure(settings["jsonrpc_server"])
            except ValueError as e:
                raise ReloadError(f"jsonrpc_server.{e}") from None
        interval = settings["directory"]["refresh_interval"]
        refresher = self._refresher
        if refresher is not None and refresher.running and refresher.interval != interval:
            refresher.stop()
            refresher.start(interval, now=False)
        self.settings = settings
        self.log.info("service directory reloaded its settings")

    def readiness(self) -> dict[str, str]:
        """Start-up and stop (see the base class), the listener, and the store."""
        checks = super().readiness()
        if checks:
            return checks
        if self.port is None:
            checks["listener"] = "jsonrpc_server is not listening"
        if self.store is None:
            checks["store"] = "not open"
        elif self._store_error is not None:
            checks["store"] = f"the last read failed: {self._store_error}"
        return checks

    def _describe(self) -> str:
        return "service directory"

    def _refresh(self) -> Deferred[int]:
        """Pick up records other SD instances appended; errors are logged, never fatal."""
        assert self.directory is not None
        d = self.directory.catch_up()

        def read(count: int) -> int:
            self._store_error = None
            return count

        def failed(failure: Failure) -> int:
            self._store_error = failure.getErrorMessage()
            self.log.warn("could not read new records: {reason}", reason=self._store_error)
            return 0

        return d.addCallbacks(read, failed)

    async def _close(self) -> None:
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        if self.watcher is not None:
            watcher, self.watcher = self.watcher, None
            await watcher.stop()
        if self.port is not None:
            port, self.port = self.port, None
            await maybeDeferred(port.stopListening)
        self.listener = None
        if self.store is not None:
            store, self.store = self.store, None
            self._store_error = "closed"
            await store.close()
