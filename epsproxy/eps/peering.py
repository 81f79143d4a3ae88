"""
The EPS-to-EPS links of one node (SPEC §12.4-§12.7, docs/protocol.md).

:class:`PeerLinks` owns every open :class:`~epsproxy.eps.links.protocol.EPSConnection` of
the node, whichever side opened it: accepted by the ``eps_server`` listener, handed to
it after a proxy rendezvous, dialled by ``eps_client`` for a call, or kept open by
``eps_client`` so that a peer can reach us over a connection we opened.  Because the
protocol carries calls in both directions, every link serves both ways; the channels
only decide *which* links they may use.

Requests arriving on a link go to the broker with the caller identified by the link's
certificate (never by anything inside the message), except ``_respond`` frames, which
carry the result of an asynchronous call back to the node that made it
(:mod:`epsproxy.eps.asynccalls`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.eps.links import wire
from epsproxy.eps.broker import Broker, BrokerError, ClientInfo, Request, Response
from epsproxy.eps.links.peers import PeerIdentity
from epsproxy.eps.links.protocol import EPSClientFactory, EPSConnection, EPSServerFactory

__all__ = [
    "INCOMING",
    "OUTGOING",
    "BROKER_ERROR",
    "NO_MATCHING_CLIENT",
    "RESPOND_METHOD",
    "PeerLinks",
]

log = Logger()

#: Direction of a link we accepted (or were handed after a rendezvous as TLS server).
INCOMING = "incoming"
#: Direction of a link we dialled.
OUTGOING = "outgoing"

#: Error code of a request the broker could not handle (the reference's stream code).
BROKER_ERROR = -100
#: Error code when no handler is ready for a request (``_respond`` without async calls).
NO_MATCHING_CLIENT = 404
#: The frame method that carries an asynchronous result back to the caller's node.
RESPOND_METHOD = "_respond"


class PeerLinks:
    """
    Open EPS links by peer operator name, and the handler of the requests they carry.

    ``broker`` (and ``async_calls``, optional) are set once the channels exist, before
    the first link opens.  ``options`` are :class:`EPSConnection` keyword options
    (``hello_timeout``, ``ping_interval``, ``dead_after``, ``max_line``).
    """

    def __init__(
        self,
        clock: IReactorTime,
        directory: Any,
        own_name: str,
        **options: Any,
    ) -> None:
        self.clock = clock
        self.directory = directory
        self.own_name = own_name
        self.options = options
        self.broker: Broker | None = None
        self.async_calls: Any = None
        self._links: dict[str, list[EPSConnection]] = {}
        self._unidentified: set[EPSConnection] = set()
        self._listeners: list[Callable[[str, str, bool], None]] = []

    # -- building and tracking links ----------------------------------------------------

    def server_factory(self, **options: Any) -> EPSServerFactory:
        """A factory for links we accept (listener or rendezvous as TLS server)."""
        factory = EPSServerFactory(
            self.directory, self.own_name, self.handle, self.clock, **{**self.options, **options}
        )
        return self._tracking(factory, INCOMING)

    def client_factory(self, kept: bool = False, **options: Any) -> EPSClientFactory:
        """A factory for links we dial; ``kept`` marks persistent ones (never idle-closed)."""
        factory = EPSClientFactory(
            self.directory, self.own_name, self.handle, self.clock, **{**self.options, **options}
        )
        return self._tracking(factory, OUTGOING, kept)

    def _tracking(self, factory: Any, direction: str, kept: bool = False) -> Any:
        build = factory.buildProtocol

        def build_and_track(addr: Any) -> EPSConnection | None:
            link = build(addr)
            if link is not None:
                link.kept = kept  # type: ignore[attr-defined]
                self.track(link, direction)
            return link

        factory.buildProtocol = build_and_track
        return factory

    def track(self, link: EPSConnection, direction: str) -> None:
        """Register ``link`` under its peer's name once its hellos are done."""
        link.direction = direction  # type: ignore[attr-defined]
        link.last_used = self.clock.seconds()  # type: ignore[attr-defined]
        self._unidentified.add(link)
        link.when_ready().addCallbacks(
            lambda peer: self._register(link, peer), lambda _: None
        )
        link.when_closed().addCallback(lambda _: self._unidentified.discard(link))

    def _register(self, link: EPSConnection, peer: PeerIdentity) -> None:
        self._unidentified.discard(link)
        self._links.setdefault(peer.name, []).append(link)
        log.info("EPS link to {peer} is up ({direction})", peer=peer.name,
                 direction=link.direction)  # type: ignore[attr-defined]
        self._notify(peer.name, link.direction, True)  # type: ignore[attr-defined]
        link.when_closed().addCallback(lambda _: self._unregister(link, peer.name))

    def _unregister(self, link: EPSConnection, name: str) -> None:
        links = self._links.get(name, [])
        if link in links:
            links.remove(link)
            if not links:
                del self._links[name]
            log.info("EPS link to {peer} is down ({direction})", peer=name,
                     direction=link.direction)  # type: ignore[attr-defined]
            self._notify(name, link.direction, False)  # type: ignore[attr-defined]

    def add_listener(self, listener: Callable[[str, str, bool], None]) -> None:
        """Call ``listener(peer_name, direction, up)`` when a link comes up or goes down."""
        self._listeners.append(listener)

    def _notify(self, name: str, direction: str, up: bool) -> None:
        for listener in self._listeners:
            try:
                listener(name, direction, up)
            except Exception:
                log.failure("EPS link listener failed")

    # -- lookups ------------------------------------------------------------------------

    def link_to(self, name: str, direction: str | None = None) -> EPSConnection | None:
        """The newest open link to operator ``name`` (of ``direction`` if given), or None."""
        for link in reversed(self._links.get(name, ())):
            if link.is_open and (
                direction is None or link.direction == direction  # type: ignore[attr-defined]
            ):
                return link
        return None

    def links(self) -> Iterator[EPSConnection]:
        """Every identified link."""
        for links in list(self._links.values()):
            yield from list(links)

    def count(self, direction: str) -> int:
        """How many identified links of ``direction`` are open."""
        return sum(1 for link in self.links() if link.direction == direction)  # type: ignore[attr-defined]

    # -- calling out --------------------------------------------------------------------

    def call(
        self, link: EPSConnection, request: Request, timeout: float | None
    ) -> defer.Deferred[Response | None]:
        """
        Send ``request`` over ``link``; fires with the peer's answer as a broker
        :class:`Response` (None when the peer's broker gave no response).
        """
        link.last_used = self.clock.seconds()  # type: ignore[attr-defined]
        params = {} if request.params is None else request.params
        d = link.call(request.method, params, id=request.id, timeout=timeout)
        return d.addCallback(_from_wire, request.id)

    def send_result(self, operator: str, params: dict[str, Any], timeout: float = 30) -> Any:
        """Send an asynchronous result (``_respond``) to ``operator`` over an open link."""
        link = self.link_to(operator)
        if link is None:
            return defer.fail(BrokerError(f"no open EPS link to {operator}"))
        link.last_used = self.clock.seconds()  # type: ignore[attr-defined]
        d = link.call(RESPOND_METHOD, params, timeout=timeout)

        def answered(response: wire.Response) -> Any:
            if response.error is not None:
                raise BrokerError(
                    f"{operator} refused the result: {response.error.get('message')}"
                )
            return response.result

        return d.addCallback(answered)

    # -- serving ------------------------------------------------------------------------

    def handle(self, request: wire.Request, peer: PeerIdentity) -> Any:
        """Answer one request a peer sent over a link (the EPSConnection handler)."""
        if request.method == RESPOND_METHOD:
            return self._async_result(request, peer)
        if self.broker is None:
            return wire.Response(request.id, error={
                "code": NO_MATCHING_CLIENT, "message": "endpoint server is starting",
            })
        answer = self.broker.deliver_now(
            Request(request.method, request.params, request.id),
            ClientInfo(peer.name, peer.entry),
        )
        if isinstance(answer, defer.Deferred):
            return answer.addCallbacks(_to_wire, _broker_failed, callbackArgs=(request.id,),
                                       errbackArgs=(request.id,))
        # Answered at once: no Deferred for the connection to wait on.
        if isinstance(answer, Failure):
            return _broker_failed(answer, request.id)
        return _to_wire(answer, request.id)

    def _async_result(self, request: wire.Request, peer: PeerIdentity) -> wire.Response:
        if self.async_calls is None:
            return wire.Response(request.id, error={
                "code": NO_MATCHING_CLIENT, "message": "no asynchronous calls are waiting",
            })
        try:
            result = self.async_calls.result_arrived(peer.name, request.params)
        except Exception as e:
            code = getattr(e, "code", BROKER_ERROR)
            return wire.Response(request.id, error={
                "code": code if isinstance(code, int) else BROKER_ERROR,
                "message": str(getattr(e, "message", e))[: wire.MAX_MESSAGE],
            })
        return wire.Response(request.id, result if isinstance(result, dict) else {})

    def close_all(self) -> defer.Deferred[None]:
        """Close every link (shutdown); fires when all are closed."""
        closing = []
        for link in list(self.links()) + list(self._unidentified):
            closing.append(link.when_closed())
            link.close()
        return defer.gatherResults(closing).addCallback(lambda _: None)


def _from_wire(response: wire.Response, request_id: str) -> Response | None:
    if response.error is not None:
        return Response(id=request_id, error=response.error)
    if response.result is wire.NO_RESULT:
        return None
    return Response(id=request_id, result=response.result)


def _to_wire(response: Response | None, request_id: str) -> wire.Response:
    if response is None:
        return wire.Response(request_id)
    if response.error is not None:
        return wire.Response(request_id, error=response.error)
    return wire.Response(request_id, response.result if response.result is not None else {})


def _broker_failed(failure: Any, request_id: str) -> wire.Response:
    if not failure.check(BrokerError):
        log.failure("broker failed on a request from a peer", failure)
        message = "internal error"
    else:
        message = str(failure.value)
    return wire.Response(request_id, error={
        "code": BROKER_ERROR,
        "message": f"error handling request: {message}"[: wire.MAX_MESSAGE],
    })
