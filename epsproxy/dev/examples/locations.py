"""
The example locations service (``eps-ls``, SPEC §21.3): a JSON-RPC 2.0 server over plain
HTTP that an EPS's ``jsonrpc_client`` channel calls.

Methods: ``add {name, id}`` stores ``name → id`` and answers ``"ok"``; ``lookup {name}``
answers the stored id, or the error ``2 "not found"``.  The ``_client`` the EPS adds to
params is accepted and ignored.  The store lives in memory and is capped
(:data:`MAX_LOCATIONS`, error ``3 "too many locations"`` beyond it).

Run it with ``python -m epsproxy.dev.examples.locations [--bind HOST:PORT]`` (default
``localhost:6666``, path ``/jsonrpc``); it logs to standard output, including the
address it is bound to.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.server import Site

from epsproxy.rules import forms
from epsproxy.net.reactor import IReactor
from epsproxy.net.hostport import parse_host_port
from epsproxy.net.jsonrpc.envelope import CallContext, Dispatcher, JSONRPCError
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS, jsonrpc_site, listen_jsonrpc

__all__ = [
    "DEFAULT_BIND",
    "MAX_LOCATIONS",
    "NOT_FOUND",
    "TOO_MANY",
    "LocationStore",
    "make_dispatcher",
    "make_site",
    "run",
    "main",
]

log = Logger()

DEFAULT_BIND = "localhost:6666"
#: Most locations kept in memory.
MAX_LOCATIONS = 100_000
#: Error code of ``lookup`` for an unknown name (as in the reference).
NOT_FOUND = 2
#: Error code of ``add`` when the store is full.
TOO_MANY = 3

_TEXT = forms.String(min_length=1, max_length=1024)
# Lenient maps: unknown keys such as the EPS's ``_client`` are dropped.
_ADD = forms.Map({"name": forms.Required(_TEXT), "id": forms.Required(_TEXT)}, strict=False)
_LOOKUP = forms.Map({"name": forms.Required(_TEXT)}, strict=False)


class LocationStore:
    """Names and their location ids, in memory, at most ``limit`` of them."""

    def __init__(self, limit: int = MAX_LOCATIONS) -> None:
        self.limit = limit
        self._locations: dict[str, str] = {}

    def add(self, params: dict[str, Any], context: CallContext) -> str:
        """The ``add`` method: store (or replace) ``name → id``; answers ``"ok"``."""
        name = params["name"]
        if name not in self._locations and len(self._locations) >= self.limit:
            raise JSONRPCError(TOO_MANY, "too many locations")
        self._locations[name] = params["id"]
        log.info("added a location ({count} stored)", count=len(self._locations))
        return "ok"

    def lookup(self, params: dict[str, Any], context: CallContext) -> str:
        """The ``lookup`` method: the id stored for ``name``, or error 2 "not found"."""
        try:
            return self._locations[params["name"]]
        except KeyError:
            raise JSONRPCError(NOT_FOUND, "not found") from None


def make_dispatcher(store: LocationStore) -> Dispatcher:
    """A dispatcher serving ``add`` and ``lookup`` from ``store``."""
    dispatcher = Dispatcher()
    dispatcher.register("add", _ADD, store.add)
    dispatcher.register("lookup", _LOOKUP, store.lookup)
    return dispatcher


def make_site(
    reactor: IReactorTime, store: LocationStore | None = None, bind: str = DEFAULT_BIND
) -> tuple[Site, dict[str, Any]]:
    """The service's ``Site`` and its validated server settings (for :func:`listen_jsonrpc`)."""
    settings = JSONRPC_SERVER_SETTINGS.validate({"bind_address": bind})
    site = jsonrpc_site(make_dispatcher(store or LocationStore()), settings, reactor=reactor)
    return site, settings


async def run(reactor: IReactor, bind: str) -> None:
    """Serve until the process is stopped."""
    site, settings = make_site(reactor, bind=bind)
    port = await listen_jsonrpc(reactor, site, settings)
    address = port.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address))  # listen_jsonrpc is TCP
    log.info("locations service listening on {host}:{port}{path}",
             host=address.host, port=address.port, path=settings["path"])
    await defer.Deferred()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``[--bind HOST:PORT]``; logs to standard output."""
    parser = argparse.ArgumentParser(
        prog="python -m epsproxy.dev.examples.locations",
        description="Example locations service (JSON-RPC over HTTP).",
    )
    parser.add_argument("--bind", default=DEFAULT_BIND, help="HOST:PORT to listen on")
    options = parser.parse_args(argv)
    try:
        parse_host_port(options.bind)
    except ValueError as e:
        parser.error(f"--bind: {e}")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, options.bind)))


if __name__ == "__main__":
    main()
