"""
Redis Sentinel for the ``redis`` datastore: where the master is now, and connections that
only ever reach a master.

:class:`MasterLocator` asks the sentinels of ``datastore.settings.sentinels``, in order,
``SENTINEL get-master-addr-by-name <master_name>``; the first that names an address wins
and is asked first next time (the client rule of the Sentinel documentation).
:class:`MasterEndpoint` is a client endpoint for txredisapi's reconnecting connections
(the store's and each pub/sub subscription's): every connection attempt asks the locator,
connects, and sends ``ROLE`` (after ``AUTH`` when a password is set) on that very
connection; only a server that answers ``master`` is handed to txredisapi.  So a failover
is followed by reconnecting: a connection lost (the master died) or dropped by the store
(a ``READONLY`` reply: the master was demoted) is re-established wherever the sentinels
now say the master is.  When an attempt verifies a master other than the last one, every
connection still open to the old one is dropped too (a subscription on a demoted master
would otherwise keep listening there).

Why not txredisapi's own ``Sentinel``/``SentinelConnectionFactory`` (1.6): it compares the
``ROLE`` reply with the text ``"master"``, which never matches on a connection with
``charset=None`` (the store's entries are bytes), so it would never accept a master; it
asks ``SENTINEL MASTERS`` and drops every sentinel's error, so a master name no sentinel
knows, an unreachable sentinel and a sentinel answering garbage all end as the same
"No master found" after a fixed 10 s on the global reactor; and it does nothing about a
``READONLY`` reply.  The conversation here is three short commands (:mod:`.resp`), every
step bounded by the store's ``timeout``.
"""

from __future__ import annotations

from typing import Callable, Sequence, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet import error
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from epsproxy.net.dial import connect_protocol, tcp_endpoint
from epsproxy.net.reactor import IReactor
from epsproxy.store import StoreUnavailable, parse_address
from epsproxy.store.resp import ErrorReply, Reply, RespError, RespReader, encode_command

__all__ = [
    "SENTINELS_SETTING",
    "MASTER_NAME_SETTING",
    "SentinelError",
    "NotMaster",
    "MasterLocator",
    "MasterEndpoint",
    "ask",
]

log = Logger()

#: The settings keys named in errors (the datastore block sits under each program's section).
SENTINELS_SETTING = "datastore.settings.sentinels"
MASTER_NAME_SETTING = "datastore.settings.master_name"

Address = tuple[str, int]


class SentinelError(StoreUnavailable):
    """No sentinel named a master: unknown name, none reachable, or garbage answers."""


class NotMaster(StoreUnavailable):
    """The server the sentinels named is not (or no longer) a master, or refused AUTH."""


class _Conversation(Protocol):
    """
    Sends ``commands`` at once; :attr:`replies` fires with their replies, in order.
    Without ``on_closed`` the connection is closed then; with it, the connection stays
    open, :meth:`hand_over` gives it (with any bytes already received after the replies)
    to another protocol, and ``on_closed(self)`` runs once it is closed.
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str | bytes | int]],
        on_closed: Callable[[_Conversation], None] | None = None,
    ) -> None:
        self._commands = commands
        self._on_closed = on_closed
        self._reader = RespReader()
        self._got: list[Reply] = []
        self._inner: IProtocol | None = None
        self._early = b""
        #: Whether the connection is gone.
        self.closed = False
        self.replies: Deferred[list[Reply]] = Deferred(lambda d: self._abort())

    @property
    def tcp(self) -> ITCPTransport:
        """The connection (only once connected)."""
        assert self.transport is not None
        return cast(ITCPTransport, self.transport)

    def _abort(self) -> None:
        if self.transport is not None:
            self.tcp.abortConnection()

    def connectionMade(self) -> None:
        self.tcp.write(b"".join(encode_command(*command) for command in self._commands))

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self.replies.called:
            self._early += data  # after the replies, before hand_over: the inner protocol's
            return
        try:
            self._got += self._reader.feed(data)
        except RespError as e:
            self.replies.errback(e)
            self._abort()
            return
        if len(self._got) >= len(self._commands):
            self.replies.callback(self._got[: len(self._commands)])
            if self._on_closed is None:
                self.tcp.loseConnection()

    def hand_over(self, inner: IProtocol) -> None:
        self._inner = inner
        inner.makeConnection(self.tcp)
        early, self._early = self._reader.rest + self._early, b""
        if early:
            inner.dataReceived(early)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self._on_closed is not None:
            self._on_closed(self)
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self.replies.called:
            self.replies.errback(ConnectionError(
                f"connection closed after {len(self._got)} of {len(self._commands)} replies"
            ))


def ask(
    reactor: IReactor,
    address: str,
    commands: Sequence[Sequence[str | bytes | int]],
    *,
    timeout: float,
    password: str | None = None,
) -> Deferred[list[Reply]]:
    """
    Connect to ``address``, send (``AUTH password`` and) ``commands``, and fire with their
    replies (the AUTH reply left out; a refused AUTH fails).  The whole exchange is
    bounded by ``timeout``; fails with StoreUnavailable naming the address.
    """

    async def _ask() -> list[Reply]:
        conversation, skip = _conversation(commands, password)
        host, port = parse_address(address)
        try:
            await connect_protocol(tcp_endpoint(reactor, host, port, timeout), conversation)
            replies = await conversation.replies
        except (defer.CancelledError, error.ConnectingCancelledError):
            conversation._abort()
            raise defer.CancelledError() from None  # addTimeout makes it a TimeoutError
        except Exception as e:
            conversation._abort()
            raise StoreUnavailable(f"{address}: {_describe(e)}") from e
        return _after_auth(address, replies, skip)

    def timed_out(failure: Failure) -> Failure:
        if failure.check(defer.CancelledError, defer.TimeoutError):
            raise StoreUnavailable(f"{address}: no answer within {timeout:g}s")
        return failure

    d = Deferred.fromCoroutine(_ask())
    return d.addTimeout(timeout, reactor).addErrback(timed_out)




def _conversation(
    commands: Sequence[Sequence[str | bytes | int]],
    password: str | None,
    *,
    on_closed: Callable[[_Conversation], None] | None = None,
) -> tuple[_Conversation, int]:
    auth: list[Sequence[str | bytes | int]] = [("AUTH", password)] if password else []
    return _Conversation([*auth, *commands], on_closed), len(auth)


def _after_auth(address: str, replies: list[Reply], skip: int) -> list[Reply]:
    if skip and isinstance(replies[0], ErrorReply):
        raise NotMaster(f"{address} refused AUTH: {replies[0].message}")
    return replies[skip:]


def _master_address(reply: Reply) -> Address:
    """The ``[host, port]`` reply of get-master-addr-by-name; ValueError for anything else."""
    if not (isinstance(reply, list) and len(reply) == 2
            and all(isinstance(item, bytes) for item in reply)):
        raise ValueError(f"answered {_short(reply)}, not [host, port]")
    host_bytes, port_bytes = reply
    assert isinstance(host_bytes, bytes) and isinstance(port_bytes, bytes)
    try:
        host = host_bytes.decode("ascii")
        port = int(port_bytes)
    except ValueError:
        raise ValueError(f"answered {_short(reply)}, not [host, port]") from None
    if not host or any(c.isspace() for c in host) or not 0 < port < 65536:
        raise ValueError(f"answered {_short(reply)}, not [host, port]")
    return host, port


def _short(reply: Reply) -> str:
    return f"{reply!r:.80}"


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _label(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MasterLocator:
    """
    Asks the sentinels where the master named ``master_name`` is, and remembers the
    last master a connection verified (:attr:`master`), telling the callbacks given to
    :meth:`on_switch` when that changes (a failover).
    """

    def __init__(
        self,
        reactor: IReactor,
        sentinels: Sequence[str],
        master_name: str,
        *,
        timeout: float,
        password: str | None = None,
    ) -> None:
        if not sentinels:
            raise ValueError("at least one sentinel is needed")
        self.master_name = master_name
        self.timeout = timeout
        #: The last master a connection verified with ROLE.
        self.master: Address | None = None
        #: Failovers seen (the verified master changed).
        self.switches = 0
        self._reactor = reactor
        self._order = list(sentinels)
        self._password = password
        self._listeners: list[Callable[[Address], None]] = []

    @property
    def description(self) -> str:
        """How logs and errors name this store's Redis."""
        return f"master {self.master_name} via sentinels {','.join(sorted(self._order))}"

    def on_switch(self, callback: Callable[[Address], None]) -> None:
        """Run ``callback(new master)`` whenever a connection verifies another master."""
        self._listeners.append(callback)

    def locate(self) -> Deferred[Address]:
        """
        The master's ``(host, port)`` as the first sentinel that knows it says; fails
        with :class:`SentinelError` naming the settings key and what each sentinel did.
        """
        return Deferred.fromCoroutine(self._locate())

    async def _locate(self) -> Address:
        failures: list[str] = []
        unknown: list[str] = []
        for address in list(self._order):
            try:
                (reply,) = await ask(
                    self._reactor, address,
                    [("SENTINEL", "get-master-addr-by-name", self.master_name)],
                    timeout=self.timeout, password=self._password,
                )
            except StoreUnavailable as e:
                failures.append(str(e))
                continue
            if reply is None:
                unknown.append(address)
                continue
            if isinstance(reply, ErrorReply):
                failures.append(f"{address} refused: {reply.message}")
                continue
            try:
                master = _master_address(reply)
            except ValueError as e:
                failures.append(f"{address} {e}")
                continue
            if self._order[0] != address:
                self._order.remove(address)
                self._order.insert(0, address)
            return master
        if unknown and not failures:
            raise SentinelError(
                f"{MASTER_NAME_SETTING} {self.master_name!r} is not a master the sentinels"
                f" know ({', '.join(unknown)} answered nil)"
            )
        reasons = failures + [f"{address} does not know it" for address in unknown]
        raise SentinelError(
            f"no sentinel of {SENTINELS_SETTING} named the master"
            f" {self.master_name!r}: {'; '.join(reasons)}"
        )

    def verified(self, master: Address) -> None:
        """A connection found ``master`` to be the master (ROLE)."""
        if master == self.master:
            return
        previous, self.master = self.master, master
        if previous is None:
            return
        self.switches += 1
        log.warn(
            "redis master {name} moved from {old} to {new}",
            name=self.master_name, old=_label(previous), new=_label(master),
        )
        for callback in list(self._listeners):
            try:
                callback(master)
            except Exception:
                log.failure("redis master switch callback failed")


@implementer(IStreamClientEndpoint)
class MasterEndpoint:
    """
    Connects to wherever the sentinels say the master is, and fires only once ``ROLE``
    on that connection said ``master``.  :attr:`last_error` keeps the reason of the last
    failed attempt (for the store's "cannot open" error); a new reason is logged once.
    """

    def __init__(
        self, reactor: IReactor, locator: MasterLocator, *, password: str | None = None
    ) -> None:
        self.last_error: str | None = None
        self._reactor = reactor
        self._locator = locator
        self._password = password
        self._open: dict[_Conversation, Address] = {}
        locator.on_switch(self._switched)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        timeout = self._locator.timeout
        try:
            master = await self._locator.locate()
            gate = await self._verified(master, timeout)
        except Exception as e:
            reason = _describe(e)
            if reason != self.last_error:
                log.warn("cannot reach the redis {description}: {error}",
                         description=self._locator.description, error=reason)
            self.last_error = reason
            raise
        if gate.closed:  # between the ROLE reply and now
            raise StoreUnavailable(f"redis at {_label(master)} closed the connection")
        self.last_error = None
        self._locator.verified(master)
        peer: IAddress = gate.tcp.getPeer()
        protocol = factory.buildProtocol(peer)
        if protocol is None:
            gate.tcp.loseConnection()
            raise StoreUnavailable("the connection factory refused the connection")
        self._open[gate] = master
        gate.hand_over(protocol)
        return protocol

    async def _verified(self, master: Address, timeout: float) -> _Conversation:
        gate, skip = _conversation([("ROLE",)], self._password, on_closed=self._closed)
        label = _label(master)
        endpoint = tcp_endpoint(self._reactor, master[0], master[1], timeout)
        try:
            await connect_protocol(endpoint, gate).addTimeout(timeout, self._reactor)
            replies = await gate.replies.addTimeout(timeout, self._reactor)
            (role,) = _after_auth(label, replies, skip)
        except StoreUnavailable:
            gate._abort()
            raise
        except Exception as e:
            gate._abort()
            if isinstance(e, (defer.TimeoutError, error.TimeoutError,
                              error.ConnectingCancelledError)):
                raise StoreUnavailable(
                    f"redis at {label} (named master {self._locator.master_name!r} by the"
                    f" sentinels) did not connect and answer ROLE within {timeout:g}s"
                ) from e
            raise StoreUnavailable(f"redis at {label}: {_describe(e)}") from e
        name = role[0] if isinstance(role, list) and role else role
        if name != b"master":
            gate.tcp.loseConnection()
            raise NotMaster(
                f"redis at {label}, named master {self._locator.master_name!r} by the"
                f" sentinels, answered ROLE with {_short(name)} (a failover in progress?)"
            )
        return gate

    def _closed(self, gate: _Conversation) -> None:
        self._open.pop(gate, None)

    def _switched(self, master: Address) -> None:
        for gate, address in list(self._open.items()):
            if address != master:
                log.info("dropping a connection to the former redis master {old}",
                         old=_label(address))
                gate.tcp.abortConnection()

    def __repr__(self) -> str:
        return f"<MasterEndpoint {self._locator.description}>"

