"""
The example internal server of the SNI passthrough demo (SPEC §21.6): the HTTP(S) server
an operator without a public address runs behind its private proxy.

- any ``GET`` answers ``{"message": "success"}``;
- a ``POST`` of JSON to ``/jsonrpc`` is a JSON-RPC call answered with the result
  ``{"message": "success"}`` (and the caller's id);
- a ``POST`` of JSON elsewhere is echoed back;
- bodies over :data:`MAX_BODY_BYTES` get 413, non-JSON bodies 400, other methods 405.

Run it with ``python -m epsproxy.dev.examples.internal_server [--bind HOST:PORT]
[--tls CERT KEY]`` (default ``localhost:7777``, plain HTTP); with ``--tls`` it serves
HTTPS with that certificate (e.g. the dev PKI's ``internal-server``, valid for
``*.internal-server.local``) and does not ask for client certificates.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web import server
from twisted.web.resource import Resource

from epsproxy.net import tls
from epsproxy.net.reactor import IReactor
from epsproxy.net.hostport import parse_host_port

__all__ = ["DEFAULT_BIND", "MAX_BODY_BYTES", "SUCCESS", "InternalServer", "make_site",
           "listen", "main"]

log = Logger()

DEFAULT_BIND = "localhost:7777"
#: Largest request body read.
MAX_BODY_BYTES = 1024 * 1024
#: What every GET (and every JSON-RPC call) answers.
SUCCESS = {"message": "success"}


def _reply(request: server.Request, status: int, value: Any) -> bytes:
    body = json.dumps(value, separators=(",", ":")).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


class InternalServer(Resource):
    """The whole example server: one leaf resource for every path."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return _reply(request, 200, SUCCESS)

    def render_HEAD(self, request: server.Request) -> bytes:
        return self.render_GET(request)

    def render_POST(self, request: server.Request) -> bytes:
        length = request.getHeader(b"content-length")
        body = request.content.read(MAX_BODY_BYTES + 1) if request.content else b""
        if len(body) > MAX_BODY_BYTES or (length and length.isdigit()
                                          and int(length) > MAX_BODY_BYTES):
            return _reply(request, 413, {"message": "request body too large"})
        try:
            value = json.loads(body)
        except ValueError:
            return _reply(request, 400, {"message": "JSON required"})
        if request.path == b"/jsonrpc":
            request_id = value.get("id") if isinstance(value, dict) else None
            return _reply(request, 200, {"jsonrpc": "2.0", "result": SUCCESS, "id": request_id})
        return _reply(request, 200, value)

    def render(self, request: server.Request) -> bytes:
        if request.method not in (b"GET", b"HEAD", b"POST"):
            request.setHeader(b"allow", b"GET, HEAD, POST")
            return _reply(request, 405, {"message": "method not allowed"})
        return super().render(request)


class _Site(server.Site):
    displayTracebacks = False


def make_site(reactor: IReactorTime) -> server.Site:
    """The server's ``Site`` (idle connections closed after 60 s)."""
    return _Site(InternalServer(), timeout=60, reactor=reactor)


def listen(
    reactor: IReactor, bind: str = DEFAULT_BIND, certificate: str | None = None,
    key: str | None = None,
) -> defer.Deferred[IListeningPort]:
    """Listen on ``bind``; over TLS (no client certificates) with ``certificate``/``key``."""
    settings = None
    if certificate is not None:
        settings = {"ca_certificate_files": [certificate], "certificate_file": certificate,
                    "key_file": key, "verify_client": False}
    return tls.listen_endpoint(reactor, bind, settings).listen(make_site(reactor))


async def _run(reactor: IReactor, bind: str, certificate: str | None, key: str | None) -> None:
    port = await listen(reactor, bind, certificate, key)
    address = port.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address))  # listen_endpoint is TCP
    log.info("internal server listening on {scheme}://{host}:{port}/",
             scheme="https" if certificate else "http", host=address.host, port=address.port)
    await defer.Deferred()


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``[--bind HOST:PORT] [--tls CERT KEY]``."""
    parser = argparse.ArgumentParser(
        prog="python -m epsproxy.dev.examples.internal_server",
        description="Example internal server: GET answers {\"message\": \"success\"}.",
    )
    parser.add_argument("--bind", default=DEFAULT_BIND, help="HOST:PORT to listen on")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"),
                        help="serve HTTPS with this certificate (chain) and key")
    options = parser.parse_args(argv)
    try:
        parse_host_port(options.bind)
    except ValueError as e:
        parser.error(f"--bind: {e}")
    certificate, key = options.tls if options.tls else (None, None)
    if certificate is not None:
        try:
            tls.server_options({"ca_certificate_files": [certificate],
                                "certificate_file": certificate, "key_file": key,
                                "verify_client": False})
        except tls.TLSSettingsError as e:
            parser.error(f"--tls: {e}")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    task.react(lambda reactor: defer.Deferred.fromCoroutine(_run(reactor, options.bind,
                                                                 certificate, key)))


if __name__ == "__main__":
    main()
