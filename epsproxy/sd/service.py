"""The running SD: opens the store, loads and verifies the records, serves JSON-RPC."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from epsproxy.net.lifecycle import AsyncStartService
from epsproxy.net.jsonrpc.server import jsonrpc_site, listen_jsonrpc
from epsproxy.net.metrics import RPCMetrics
from epsproxy.net.reactor import IReactor
from epsproxy.rules.records import TrustStore
from ..store import Store, open_store
from .api import sd_dispatcher
from .directory import ServiceDirectory

if TYPE_CHECKING:
    from ..store.redis_pubsub import StoreWatcher

__all__ = ["ServiceDirectoryService"]


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
        #: Follows appends of other SD instances (a StoreWatcher; Redis store only).
        self.watcher: StoreWatcher | None = None

    async def _start(self) -> IListeningPort:
        directory_settings = self.settings["directory"]
        self.store = await open_store(self.reactor, directory_settings["datastore"])
        self.directory = ServiceDirectory(self.store, self.trust)
        await self.directory.refresh()
        records = len(self.directory.record_log.selected.records)
        server_settings = self.settings["jsonrpc_server"]
        dispatcher = sd_dispatcher(self.directory)
        self._register_metrics()
        site = jsonrpc_site(
            dispatcher, server_settings, reactor=self.reactor,
            metrics=RPCMetrics(self.registry, "sd", dispatcher.__contains__),
        )
        self.port = await listen_jsonrpc(self.reactor, site, server_settings)
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

    def _describe(self) -> str:
        return "service directory"

    def _refresh(self) -> Deferred[int]:
        """Pick up records other SD instances appended; errors are logged, never fatal."""
        assert self.directory is not None
        d = self.directory.catch_up()
        d.addErrback(
            lambda f: self.log.warn("could not read new records: {reason}",
                                    reason=f.getErrorMessage())
        )
        return d

    async def _close(self) -> None:
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        if self.watcher is not None:
            watcher, self.watcher = self.watcher, None
            await watcher.stop()
        if self.port is not None:
            port, self.port = self.port, None
            await maybeDeferred(port.stopListening)
        if self.store is not None:
            store, self.store = self.store, None
            await store.close()
