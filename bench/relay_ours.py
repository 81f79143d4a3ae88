"""
Our relay as a process of its own, for the relay benchmark (:mod:`bench.relay`): a
:class:`~epsproxy.proxy.rendezvous_server.Rendezvous` behind an internal listener, exactly as
the public proxy runs it (``reactor.listenTCP(0, rendezvous.factory())``), plus a control
channel through which the load generators ask for tokens (in the proxy,
``requestConnection`` hands them out).

``python -m bench.relay_ours [CONFIG_JSON]`` prints ``internal PORT control PORT`` once
both listen, then serves until SIGTERM.  The control channel is line-based on loopback:

- ``new N`` -> N lines, each a fresh token in base64 (:meth:`Rendezvous.new_token`);
- ``stats`` -> one JSON line: ``pending``, ``active_splices``, ``pairings``, ``timeouts``,
  ``refused``, ``bytes_spliced``, and ``reactor`` (the reactor's class: the programs'
  own, :class:`epsproxy.net.reactor.EPollReactor`, as twistd runs the public proxy).

``CONFIG_JSON`` (optional) gives keyword arguments of ``Rendezvous``, and
``"splice_engine": false`` relays in Python (the proxies' setting of that name); the environment
variable ``BENCH_RELAY_IMPL=module:Class`` swaps in another implementation with the same
API (to compare designs).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import sys
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from epsproxy.net.reactor import install_default
from epsproxy.proxy.splice_engine import SpliceEngine

__all__ = ["Control", "rendezvous_class", "main"]

DEFAULT_IMPL = "epsproxy.proxy.rendezvous_server:Rendezvous"
#: The most tokens one ``new`` line may ask for.
MAX_BATCH = 10_000


def rendezvous_class() -> type:
    """The relay measured: ``$BENCH_RELAY_IMPL`` or :data:`DEFAULT_IMPL`."""
    module, _, name = os.environ.get("BENCH_RELAY_IMPL", DEFAULT_IMPL).partition(":")
    return getattr(importlib.import_module(module), name)


class Control(LineReceiver):
    """One control connection: ``new N`` and ``stats`` (see the module docstring)."""

    delimiter = b"\n"
    MAX_LENGTH = 64

    def __init__(self, rendezvous: Any, reactor: str) -> None:
        self.rendezvous = rendezvous
        self.reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        words = line.split()
        if len(words) == 2 and words[0] == b"new" and words[1].isdigit():
            count = min(int(words[1]), MAX_BATCH)
            self.transport.write(b"".join(
                base64.b64encode(self.rendezvous.new_token()) + b"\n" for _ in range(count)))
        elif words == [b"stats"]:
            r = self.rendezvous
            stats = {name: getattr(r, name, None) for name in (
                "pending", "active_splices", "pairings", "timeouts", "refused",
                "bytes_spliced")}
            stats["reactor"] = self.reactor
            self.transport.write(json.dumps(stats).encode() + b"\n")
        else:
            self.transport.loseConnection()


def main(argv: list[str]) -> None:
    install_default()  # the programs' reactor, as twistd runs the public proxy on it
    from twisted.internet import reactor

    options = json.loads(argv[0]) if argv else {}
    # As the public proxy builds it: the splice engine relays unless the setting
    # splice_engine is false (or the engine's C part was not built).
    if options.pop("splice_engine", True):
        options["engine"] = SpliceEngine.shared(reactor)
    rendezvous = rendezvous_class()(reactor, **options)
    internal = reactor.listenTCP(0, rendezvous.factory(), backlog=1024, interface="127.0.0.1")
    kind = type(reactor)
    name = f"{kind.__module__}.{kind.__qualname__}"
    control = reactor.listenTCP(0, Factory.forProtocol(lambda: Control(rendezvous, name)),
                                interface="127.0.0.1")
    print(f"internal {internal.getHost().port} control {control.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
