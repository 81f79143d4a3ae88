"""
Where requests enter this node's broker from the parts that are built before it.

The broker needs its channels, and some channels need the broker: the peer links serve
requests from other EPS servers (:meth:`Inbox.serve`, the links' ``serve``), the gateway
submits its callers' requests, and a dial through a proxy asks the proxy for a
connection (:func:`request_connection`).  They all get the :class:`Inbox` when they are
built; the wiring block of :mod:`epsproxy.eps.service` opens it once, with the broker and
the asynchronous calls, right after building the broker.  Before that, requests are
refused ("starting"), never queued.

It also turns broker requests into link calls and back (:func:`call`), and carries an
asynchronous result to the caller's node (:func:`send_result`, ``_respond``): the links
layer itself knows nothing of the broker.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.rules import forms
from epsproxy.net.token import TokenError, decode_token
from epsproxy.eps.broker import Broker, BrokerError, ClientInfo, Request, Response
from epsproxy.eps.links import wire
from epsproxy.eps.links.peers import PeerIdentity
from epsproxy.eps.links.protocol import EPSConnection
from epsproxy.eps.links.registry import LinkRegistry
from epsproxy.eps.links.session import LinkError

__all__ = [
    "BROKER_ERROR",
    "NO_MATCHING_CLIENT",
    "RESPOND_METHOD",
    "Inbox",
    "call",
    "send_result",
    "ProxyRefused",
    "request_connection",
]

log = Logger()

#: Error code of a request the broker could not handle (the reference's stream code).
BROKER_ERROR = -100
#: Error code when no handler is ready for a request (``_respond`` without async calls).
NO_MATCHING_CLIENT = 404
#: The frame method that carries an asynchronous result back to the caller's node.
RESPOND_METHOD = "_respond"


class Inbox:
    """The broker (and the asynchronous calls) for the parts built before them."""

    def __init__(self) -> None:
        self._broker: Broker | None = None
        self._async_calls: Any = None

    def open(self, broker: Broker, async_calls: Any = None) -> None:
        """Let requests in: to ``broker``, and ``_respond`` results to ``async_calls``."""
        if self._broker is not None:
            raise RuntimeError("the inbox is already open")
        self._broker = broker
        self._async_calls = async_calls

    def deliver(
        self, request: Request, client_info: ClientInfo | None
    ) -> defer.Deferred[Response | None]:
        """:meth:`Broker.deliver`, or a :class:`BrokerError` while the node starts."""
        if self._broker is None:
            return defer.fail(BrokerError("the endpoint server is starting"))
        return self._broker.deliver(request, client_info)

    def serve(self, request: wire.Request, peer: PeerIdentity) -> Any:
        """Answer one request a peer sent over a link (the links' ``serve``)."""
        if request.method == RESPOND_METHOD:
            return self._async_result(request, peer)
        broker = self._broker
        if broker is None:
            return wire.Response(request.id, error={
                "code": NO_MATCHING_CLIENT, "message": "endpoint server is starting",
            })
        answer = broker.deliver_now(
            Request(request.method, request.params, request.id),
            ClientInfo(peer.name, peer.entry),
        )
        if isinstance(answer, defer.Deferred):
            return answer.addCallbacks(_to_wire, _broker_failed, callbackArgs=(request.id,),
                                       errbackArgs=(request.id,))
        # Answered at once: no Deferred for the link to wait on.
        if isinstance(answer, Failure):
            return _broker_failed(answer, request.id)
        return _to_wire(answer, request.id)

    def _async_result(self, request: wire.Request, peer: PeerIdentity) -> wire.Response:
        if self._async_calls is None:
            return wire.Response(request.id, error={
                "code": NO_MATCHING_CLIENT, "message": "no asynchronous calls are waiting",
            })
        try:
            result = self._async_calls.result_arrived(peer.name, request.params)
        except Exception as e:
            code = getattr(e, "code", BROKER_ERROR)
            return wire.Response(request.id, error={
                "code": code if isinstance(code, int) else BROKER_ERROR,
                "message": str(getattr(e, "message", e))[: wire.MAX_MESSAGE],
            })
        return wire.Response(request.id, result if isinstance(result, dict) else {})


_PROXY_ANSWER = forms.Map(
    {
        "token": forms.Required(forms.String(max_length=200)),
        "endpoint": forms.Required(forms.String(min_length=1, max_length=300)),
    },
    strict=False,
)


class ProxyRefused(Exception):
    """A proxy gave no connection: unreachable, refused, or an answer that makes no sense."""


def request_connection(
    inbox: Inbox, own_name: str, own_entry: Callable[[], dict[str, Any]]
) -> Callable[[str, str], defer.Deferred[tuple[bytes, str]]]:
    """
    The dialer's way to ask ``proxy`` for a connection to ``operator``
    (``requestConnection``, SPEC §15 step 2), through our own broker as our own caller:
    ``ask(proxy, operator)`` fires with the token and the endpoint to meet at, or fails
    with :class:`ProxyRefused`.
    """

    async def asking(proxy: str, operator: str) -> tuple[bytes, str]:
        method = f"{proxy}.requestConnection"
        request = Request(method, {"to": operator, "channel": "eps_server"},
                          f"{method}({secrets.token_hex(8)})")
        try:
            response = await inbox.deliver(request, ClientInfo(own_name, own_entry()))
        except Exception as e:
            raise ProxyRefused(f"cannot ask proxy {proxy} for a connection: {e}") from None
        if response is None:
            raise ProxyRefused(f"proxy {proxy} gave no answer to requestConnection")
        if response.error is not None:
            raise ProxyRefused(
                f"proxy {proxy} refused a connection to {operator}: "
                f"{str(response.error.get('message'))[:300]}"
            )
        try:
            answer = _PROXY_ANSWER.validate(response.result)
            token = decode_token(answer["token"])
        except (forms.FormError, TokenError) as e:
            raise ProxyRefused(f"proxy {proxy} answered nonsense: {e}") from None
        return token, answer["endpoint"]

    def ask(proxy: str, operator: str) -> defer.Deferred[tuple[bytes, str]]:
        return defer.ensureDeferred(asking(proxy, operator))

    return ask


def call(
    links: LinkRegistry, link: EPSConnection, request: Request, timeout: float | None
) -> defer.Deferred[Response | None]:
    """
    Send ``request`` over ``link``; fires with the peer's answer as a broker
    :class:`Response` (None when the peer's broker gave no response).
    """
    params = {} if request.params is None else request.params
    d = links.call(link, request.method, params, id=request.id, timeout=timeout)
    return d.addCallback(_from_wire, request.id)


def send_result(
    links: LinkRegistry, operator: str, params: dict[str, Any], timeout: float = 30
) -> defer.Deferred[Any]:
    """Send an asynchronous result (``_respond``) to ``operator`` over an open link."""
    link = links.link_to(operator)
    if link is None:
        return defer.fail(LinkError(f"no open EPS link to {operator}"))
    d = links.call(link, RESPOND_METHOD, params, timeout=timeout)

    def answered(response: wire.Response) -> Any:
        if response.error is not None:
            raise LinkError(f"{operator} refused the result: {response.error.get('message')}")
        return response.result

    return d.addCallback(answered)


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
