"""The running SD: opens the store, loads and verifies the records, serves JSON-RPC."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..jsonrpc import jsonrpc_site, listen_jsonrpc
from ..records import TrustStore
from ..store import Store, open_store
from .api import sd_dispatcher
from .directory import ServiceDirectory

__all__ = ["ServiceDirectoryService"]


class ServiceDirectoryService(Service):
    """
    Starts the SD asynchronously; ``ready`` fires with the listening port once it serves.

    If start-up fails (store unreachable, port taken) the failure is logged with its
    reason and the reactor is stopped, so ``twistd -n sd`` exits instead of idling.
    """

    log = Logger()

    def __init__(self, reactor: Any, settings: dict, trust: TrustStore) -> None:
        self.reactor = reactor
        self.settings = settings
        self.trust = trust
        self.directory: ServiceDirectory | None = None
        self.port: IListeningPort | None = None
        self.store: Store | None = None
        self._refresher: LoopingCall | None = None
        self.ready: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()
        d = ensureDeferred(self._start())
        d.addCallbacks(self.ready.callback, self._start_failed)

    async def _start(self) -> IListeningPort:
        directory_settings = self.settings["directory"]
        self.store = await open_store(self.reactor, directory_settings["datastore"])
        self.directory = ServiceDirectory(self.store, self.trust)
        await self.directory.refresh()
        records = len(self.directory.record_log.selected.records)
        server_settings = self.settings["jsonrpc_server"]
        site = jsonrpc_site(sd_dispatcher(self.directory), server_settings, reactor=self.reactor)
        self.port = await listen_jsonrpc(self.reactor, site, server_settings)
        self._refresher = LoopingCall(self._refresh)
        self._refresher.clock = self.reactor
        self._refresher.start(directory_settings["refresh_interval"], now=False)
        address = self.port.getHost()
        self.log.info(
            "service directory serving {records} verified record(s) at {host}:{port}{path}",
            records=records,
            host=address.host,
            port=address.port,
            path=server_settings["path"],
        )
        return self.port

    def _start_failed(self, failure: Failure) -> None:
        self.log.failure("service directory could not start: {reason}", failure,
                         reason=failure.getErrorMessage())
        self.ready.errback(failure)
        self.ready.addErrback(lambda _: None)
        if self.reactor.running:
            self.reactor.stop()

    def _refresh(self) -> Deferred[int]:
        """Pick up records other SD instances appended; errors are logged, never fatal."""
        assert self.directory is not None
        d = self.directory.refresh()
        d.addErrback(
            lambda f: self.log.warn("could not read new records: {reason}",
                                    reason=f.getErrorMessage())
        )
        return d

    async def _stop(self) -> None:
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
        if self.store is not None:
            await self.store.close()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return ensureDeferred(self._stop())
