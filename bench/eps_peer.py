"""
The processes of our side of the EPS messaging benchmark (:mod:`bench.eps`): an EPS
node that answers over our line protocol through the full broker path, and a load
generator that calls it.

- ``python -m bench.eps_peer server CONFIG_JSON``: hd-2.  Accepts one mutual-TLS
  :class:`~epsproxy.eps.links.protocol.EPSConnection` and hands every request to
  :meth:`~epsproxy.eps.broker.Broker.deliver` (directory lookups, permission check,
  ``_client`` injection), which delivers it to an in-process echo channel standing in for
  the local service.  Prints ``listening on PORT``.
- ``python -m bench.eps_peer client CONFIG_JSON``: hd-1.  Connects, then calls
  ``hd-2.echo`` as :func:`measure` says and prints its JSON.

The set-up of our side is all in :func:`server_factory` and :func:`client_factory`, so
moving the benchmark onto the real ``eps_server``/``eps_client`` channels changes only them.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task

from epsproxy.net import tls
from epsproxy.directory.jsondir import JSONDirectory
from epsproxy.eps import broker
from epsproxy.eps.links import wire
from epsproxy.eps.addresses import Address
from epsproxy.eps.links.protocol import EPSClientFactory, EPSServerFactory
from epsproxy.eps.inbox import Inbox
from epsproxy.eps.links.registry import LinkRegistry

from .common import cpu_seconds, percentile

__all__ = ["EchoChannel", "server_factory", "client_factory", "measure", "main"]

#: The names of the two nodes: the caller (client side) and the callee (server side).
CLIENT, SERVER = "hd-1", "hd-2"
#: The method called, and the address form of the ids (SPEC §9.2).
METHOD = f"{SERVER}.echo"


def params(n: int) -> dict[str, Any]:
    """The payload of call ``n`` (the same for every variant of the benchmark)."""
    return {"name": "x", "n": n}


class EchoChannel:
    """A channel delivering to our own operator: answers with the params, less ``_client``."""

    name = "bench-echo"
    type = "bench_echo"

    def __init__(self, own_name: str) -> None:
        self.own_name = own_name

    def can_deliver_to(self, address: Address) -> bool:
        return address.operator == self.own_name

    def deliver(self, request: broker.Request, client_info: broker.ClientInfo,
                address: Address | None = None) -> broker.Response:
        result = {k: v for k, v in (request.params or {}).items() if k != "_client"}
        return broker.Response(request.id, result=result)


def _tls_block(config: dict[str, Any]) -> dict[str, Any]:
    return {"ca_certificate_files": [config["root"]], "certificate_file": config["crt"],
            "key_file": config["key"]}


def server_factory(reactor: Any, directory: str) -> EPSServerFactory:
    """
    hd-2's side: what an ``eps_server`` channel accepts with — links from
    :class:`LinkRegistry`, whose every request goes through the broker (directory lookups,
    permission check, ``_client`` injection) to the echo channel.
    """
    entries = JSONDirectory(directory, SERVER, reload_interval=1.0)
    inbox = Inbox()
    links = LinkRegistry(reactor, entries, SERVER, inbox.serve)
    inbox.open(broker.Broker(entries, [EchoChannel(SERVER)], reactor))
    return links.server_factory()


def client_factory(reactor: Any, directory: str) -> EPSClientFactory:
    """hd-1's side: what an ``eps_client`` channel dials with (it has no broker to serve)."""
    entries = JSONDirectory(directory, CLIENT, reload_interval=1.0)
    return LinkRegistry(reactor, entries, CLIENT, Inbox().serve).client_factory()


async def measure(
    config: dict[str, Any],
    call: Callable[[int], Awaitable[Any]],
    gather: Callable[[list[Any]], Awaitable[Any]],
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """
    The load procedure shared by every variant: a warm-up at the highest load, then one
    phase per entry of ``config["in_flight"]``, each keeping that many ``call(n)`` in
    flight for ``config["duration"]`` seconds (or, when ``config["calls"]`` is set, for
    that many calls).  ``gather`` awaits a list of coroutines in the caller's event loop.

    Returns ``{"<in flight>": {"calls", "seconds", "p50_us", "p99_us", "server_cpu"}}``;
    ``server_cpu`` is the CPU seconds process ``config["server_pid"]`` used in the phase.
    """
    numbers = itertools.count(1)
    server_pid = config["server_pid"]

    async def phase(in_flight: int, seconds: float, calls: int | None) -> dict[str, Any]:
        latencies: list[float] = []
        left = [calls or 0]
        deadline = clock() + seconds

        async def loop() -> None:
            while (left[0] > 0) if calls else (clock() < deadline):
                left[0] -= 1
                n = next(numbers)
                started = clock()
                await call(n)
                latencies.append(clock() - started)

        cpu = cpu_seconds(server_pid)
        started = clock()
        await gather([loop() for _ in range(in_flight)])
        elapsed = clock() - started
        return {
            "calls": len(latencies),
            "seconds": elapsed,
            "p50_us": percentile(latencies, 0.5) * 1e6,
            "p99_us": percentile(latencies, 0.99) * 1e6,
            "server_cpu": cpu_seconds(server_pid) - cpu,
        }

    loads = config["in_flight"]
    calls = config.get("calls")
    await phase(max(loads), config["warmup"], calls and max(1, calls // 4))
    return {str(n): await phase(n, config["duration"], calls) for n in loads}


async def _load(reactor: Any, config: dict[str, Any]) -> dict[str, Any]:
    endpoint = tls.client_endpoint(reactor, f"127.0.0.1:{config['port']}", _tls_block(config),
                                   SERVER)
    connection = await endpoint.connect(client_factory(reactor, config["directory"]))
    await connection.when_ready()

    def check(response: wire.Response, n: int) -> None:
        if response.error is not None or response.result != params(n):
            raise RuntimeError(f"unexpected answer to call {n}: {response}")

    def call(n: int) -> defer.Deferred[None]:
        d = connection.call(METHOD, params(n), id=f"{METHOD}({n})")
        return d.addCallback(check, n)

    def gather(coroutines: list[Any]) -> defer.Deferred[Any]:
        return defer.gatherResults([defer.ensureDeferred(c) for c in coroutines],
                                   consumeErrors=True)

    result = await measure(config, call, gather)
    closed = connection.when_closed()
    connection.transport.loseConnection()
    await closed
    return result


async def _serve(reactor: Any, config: dict[str, Any]) -> None:
    port = await tls.listen_endpoint(reactor, "127.0.0.1:0", _tls_block(config)).listen(
        server_factory(reactor, config["directory"]))
    print("listening on", port.getHost().port, flush=True)
    await defer.Deferred()  # until killed


def main(argv: list[str]) -> None:
    command, config = argv[0], json.loads(argv[1])
    if command == "server":
        task.react(lambda reactor: defer.ensureDeferred(_serve(reactor, config)))
    elif command == "client":
        def run(reactor: Any) -> defer.Deferred[None]:
            d = defer.ensureDeferred(_load(reactor, config))
            return d.addCallback(lambda result: print(json.dumps(result), flush=True))
        task.react(run)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
