"""
Outgoing EPS links (SPEC §12.7, §15): dial a peer whose directory entry names a
reachable server, directly or through its proxy's peer-to-peer brokering, and keep links
open to the peers that may call us, so a node without a reachable server still receives
calls.

Better than the reference, on purpose (SPEC §23.2 #14-#17): an open link is reused for
every call; a broken peer entry skips that peer only; kept links reconnect on their own
with exponential backoff and jitter instead of once a minute; a proxied link is brokered
once and reused while it lives.  Asking a proxy for a connection is the
``request_connection`` callable given at construction: the dialer never sees the broker.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Protocol

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.directory import entries as _entries
from epsproxy.eps.links import wire
from epsproxy.eps.links.protocol import EPSConnection
from epsproxy.eps.links.registry import OUTGOING, LinkRegistry, link_options
from epsproxy.net import tls
from epsproxy.net.reactor import IReactor
from epsproxy.net.token import dial_with_token

__all__ = ["DialError", "RequestConnection", "SERVER_TYPES", "Dialer"]

log = Logger()

#: The directory channel types of a reachable EPS server (ours, and the reference's).
SERVER_TYPES = ("eps_server", "grpc_server")

RequestConnection = Callable[[str, str], "defer.Deferred[tuple[bytes, str]]"]
"""``request_connection(proxy, operator)``: fires with ``(token, endpoint)`` to meet
``operator`` at ``proxy``'s internal endpoint (SPEC §15 steps 2-5), or fails saying why."""


class DialError(Exception):
    """No link to a peer: it is unreachable, refused us, or is not who we dialled."""


class Directory(Protocol):
    """What dialing needs of the directory (an ``add_listener`` method is optional)."""

    def entries(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...

    def entry_for(self, name: str) -> dict[str, Any]: ...

    def own_entry(self) -> dict[str, Any]: ...


class _Keeper:
    """
    A persistent link to one peer: dial, and after every failure or loss dial again
    after a delay from ``policy`` (exponential backoff with jitter).  The attempt count
    resets only when a link stayed up for ``stable_after`` seconds, so a peer that
    refuses us right after the handshake is not hammered.
    """

    def __init__(self, name: str, address: str, endpoint: Any, factory: Any, clock: IReactorTime,
                 policy: Callable[[int], float], stable_after: float = 10.0) -> None:
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

    def _failed(self, failure: Failure) -> None:
        self._connecting = self._candidate = None
        if self._stopped:
            return
        log.warn("cannot link to {peer} at {address}: {error}", peer=self.name,
                 address=self.address, error=failure.getErrorMessage()[:300])
        self._retry()

    def _retry(self) -> None:
        self.attempts += 1
        self._timer = self.clock.callLater(self.policy(self.attempts), self._connect)

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
            waiter.errback(DialError(f"no longer keeping a link to {self.name}"))
        closing = []
        for link in (self._candidate, self.link):
            if link is not None:
                closing.append(link.when_closed())
                link.close()
        return defer.gatherResults(closing).addCallback(lambda _: None)


class Dialer:
    """
    The outgoing links of one node, from validated ``eps_client`` ``settings`` (``tls``,
    ``use_proxy``, ``proxy_url``, ``connect_timeout``, ``idle_timeout``,
    ``maintenance_interval``, the reconnect delays and the link options).  Links it makes
    are registered in ``registry``; ``request_connection``, if given, lets it reach peers
    behind a proxy.
    """

    def __init__(
        self,
        reactor: IReactor,
        registry: LinkRegistry,
        directory: Directory,
        own_name: str,
        settings: dict[str, Any],
        request_connection: RequestConnection | None = None,
    ) -> None:
        self.reactor = reactor
        self.registry = registry
        self.directory = directory
        self.own_name = own_name
        self.settings = settings
        self.request_connection = request_connection
        self.use_proxy = settings["use_proxy"] if settings.get("useProxy") is None else (
            settings["useProxy"]
        )
        self._keepers: dict[str, _Keeper] = {}
        self._dialing: dict[str, list[defer.Deferred[EPSConnection]]] = {}
        self._loop: LoopingCall | None = None

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """
        Dial with ``settings`` (validated ``eps_client`` settings) from the next dial on:
        TLS files, proxy use, timeouts, reconnect delays (of keepers made from now on),
        the maintenance interval and the link options.  Open links are kept.  Raises
        :class:`epsproxy.net.tls.TLSSettingsError` on unusable TLS files, changing nothing.
        """
        tls.client_options(settings["tls"], self.own_name)
        interval_changed = settings["maintenance_interval"] != self.settings["maintenance_interval"]
        self.settings = settings
        self.use_proxy = settings["use_proxy"] if settings.get("useProxy") is None else (
            settings["useProxy"]
        )
        loop = self._loop
        if interval_changed and loop is not None and loop.running:
            loop.stop()
            loop.start(settings["maintenance_interval"], now=False)

    # -- dialling -----------------------------------------------------------------------

    def server_settings(self, operator: str) -> dict[str, Any] | None:
        """The settings of ``operator``'s eps_server in the directory, if usable."""
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

    def link_for(self, operator: str) -> defer.Deferred[EPSConnection]:
        """An open, identified link to ``operator``: an existing one, or a new one."""
        link = self.registry.link_to(operator)
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
        settings = self.server_settings(operator)
        if settings is None:
            raise DialError(f"{operator} has no reachable eps_server in the directory")
        proxy = settings.get("proxy")
        if proxy:
            if not self.use_proxy:
                raise DialError(
                    "destination is only reachable via proxy but proxying is disabled"
                )
            link = await self._dial_via_proxy(operator, proxy)
        else:
            endpoint = self._endpoint(settings["address"], operator)
            try:
                link = await endpoint.connect(self._factory())
            except Exception as e:
                raise DialError(
                    f"cannot connect to {operator} at {settings['address']}: {e}"
                ) from None
        try:
            await link.when_ready()
        except Exception as e:
            raise DialError(f"link to {operator} failed: {e}") from None
        if link.peer is None or link.peer.name != operator:
            link.close(wire.ERR_IDENTITY, "not the operator we dialled")
            raise DialError(f"the server at {settings['address']} is not {operator}")
        return link

    def _factory(self, kept: bool = False) -> Any:
        return self.registry.client_factory(kept=kept, **link_options(self.settings))

    def _endpoint(self, address: str, operator: str) -> Any:
        options: dict[str, Any] = {"timeout": self.settings["connect_timeout"]}
        if self.settings.get("proxy_url") is not None:
            options["proxy_url"] = self.settings["proxy_url"]
        return tls.client_endpoint(self.reactor, address, self.settings["tls"], operator,
                                   **options)

    async def _dial_via_proxy(self, operator: str, proxy: str) -> EPSConnection:
        """P2P brokering, client side (SPEC §15 steps 2, 5, 6)."""
        if self.request_connection is None:
            raise DialError("no way to ask the proxy for a connection")
        if proxy == operator:
            raise DialError(f"{operator} names itself as its proxy")
        try:
            token, endpoint = await self.request_connection(proxy, operator)
        except Exception as e:
            raise DialError(str(e)) from None
        try:
            link = await dial_with_token(
                self.reactor, endpoint, token, self.settings["tls"], self._factory(),
                tls_client_for=operator, timeout=self.settings["connect_timeout"],
            )
        except Exception as e:
            raise DialError(
                f"cannot reach {operator} through proxy {proxy} at {endpoint}: {e}"
            ) from None
        log.info("link to {peer} brokered by proxy {proxy}", peer=operator, proxy=proxy)
        return link

    # -- kept links ---------------------------------------------------------------------

    def start(self) -> None:
        """Open the kept links now, then revise them periodically and on change."""
        self._loop = LoopingCall(self.maintain)
        self._loop.clock = self.reactor
        self._loop.start(self.settings["maintenance_interval"], now=True)
        add_listener = getattr(self.directory, "add_listener", None)
        if callable(add_listener):
            add_listener(self.maintain)

    def stop(self) -> defer.Deferred[None]:
        """Stop the kept links and the maintenance."""
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
            candidates = self.directory.entries({"channels": list(SERVER_TYPES)})
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
        """Revise the kept links, and close links we dialled that stayed idle."""
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
        for record in list(self.registry.records()):
            if (
                record.direction == OUTGOING
                and not record.kept
                and now - record.last_used > self.settings["idle_timeout"]
            ):
                link = record.link
                log.info("closing idle link to {peer}", peer=link.peer.name if link.peer else "?")
                link.close(wire.ERR_SHUTDOWN, "idle")

    def _keep(self, name: str, address: str) -> _Keeper:
        log.info("keeping a link to {peer} at {address}", peer=name, address=address)
        keeper = _Keeper(
            name,
            address,
            self._endpoint(address, name),
            self._factory(kept=True),
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
            return defer.fail(DialError(f"no persistent link to {name}"))
        return keeper.when_up()
