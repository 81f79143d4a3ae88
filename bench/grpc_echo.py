"""
The gRPC side of the EPS messaging benchmark (:mod:`bench.eps`): a minimal echo server
and a load generator on grpcio's asyncio API (``grpc.aio``), over mutual TLS with the
dev PKI.

The messages are the reference's (SPEC §12.4: ``params``/``result`` as
``google.protobuf.Struct``), built at run time from hand-made descriptors so no code
generator (grpcio-tools) is needed.  The service ``EPS`` has the reference's unary
``Call`` and, for the benchmark only, ``Stream``: one bidirectional stream of requests
and responses, matched by id on the client.

Run as ``python -m bench.grpc_echo server ROOT CRT KEY`` (prints ``listening on PORT``)
and ``python -m bench.grpc_echo client CONFIG_JSON`` (see :func:`bench.eps_peer.run_load`
for the config and the JSON it prints).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from .eps_peer import measure

__all__ = ["messages", "serve", "unary_caller", "StreamCaller", "main"]

#: Name the client expects in the server's certificate (a DNS SAN of the dev PKI).
SERVER_NAME = "hd-2"


def messages() -> tuple[type, type]:
    """The ``Request`` and ``Response`` message classes of SPEC §12.4 (no package)."""
    pool = descriptor_pool.DescriptorPool()
    struct_file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_file)
    pool.Add(struct_file)

    proto = descriptor_pb2.FileDescriptorProto(
        name="eps_bench.proto", syntax="proto3", dependency=["google/protobuf/struct.proto"]
    )
    F = descriptor_pb2.FieldDescriptorProto
    string, int32, message = F.TYPE_STRING, F.TYPE_INT32, F.TYPE_MESSAGE

    def add(name: str, *fields: tuple[str, int, int, str]) -> None:
        m = proto.message_type.add(name=name)
        for field_name, number, kind, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=F.LABEL_OPTIONAL)
            if type_name:
                f.type_name = type_name

    struct = ".google.protobuf.Struct"
    add("Request", ("method", 1, string, ""), ("params", 2, message, struct),
        ("id", 3, string, ""), ("clientName", 4, string, ""))
    add("Error", ("code", 1, int32, ""), ("message", 2, string, ""), ("data", 3, message, struct))
    add("Response", ("id", 1, string, ""), ("result", 2, message, struct),
        ("error", 3, message, ".Error"))
    pool.Add(proto)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("Request")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("Response")))


Request, Response = messages()


def _echo(request: Any) -> Any:
    response = Response(id=request.id)
    response.result.CopyFrom(request.params)
    return response


async def _call(request: Any, context: grpc.aio.ServicerContext) -> Any:
    return _echo(request)


async def _stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                  ) -> AsyncIterator[Any]:
    async for request in requests:
        yield _echo(request)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


async def serve(root: str, crt: str, key: str) -> None:
    """Serve ``EPS/Call`` and ``EPS/Stream`` on 127.0.0.1 (a free port) until killed."""
    server = grpc.aio.server()
    handlers = {
        "Call": grpc.unary_unary_rpc_method_handler(
            _call, request_deserializer=Request.FromString,
            response_serializer=Response.SerializeToString),
        "Stream": grpc.stream_stream_rpc_method_handler(
            _stream, request_deserializer=Request.FromString,
            response_serializer=Response.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("EPS", handlers),))
    credentials = grpc.ssl_server_credentials(
        [(_read(key), _read(crt))], root_certificates=_read(root), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    print("listening on", port, flush=True)
    await server.wait_for_termination()


def _request(n: int) -> Any:
    request = Request(method="hd-2.echo", id=f"hd-2.echo({n})", clientName="hd-1")
    request.params.update({"name": "x", "n": n})
    return request


def unary_caller(channel: grpc.aio.Channel) -> Callable[[int], Awaitable[None]]:
    """``await call(n)``: one unary ``EPS/Call`` carrying call number ``n``."""
    method = channel.unary_unary("/EPS/Call", request_serializer=Request.SerializeToString,
                                 response_deserializer=Response.FromString)

    async def call(n: int) -> None:
        response = await method(_request(n))
        if response.id != f"hd-2.echo({n})":
            raise RuntimeError(f"wrong answer {response.id!r}")
    return call


class StreamCaller:
    """``await caller(n)``: one request on a shared ``EPS/Stream``, answer matched by id."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        method = channel.stream_stream(
            "/EPS/Stream", request_serializer=Request.SerializeToString,
            response_deserializer=Response.FromString)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._stream = method(self._requests())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            yield await self._queue.get()

    async def _read(self) -> None:
        async for response in self._stream:
            future = self._waiting.pop(response.id, None)
            if future is not None:
                future.set_result(response)
        for future in self._waiting.values():
            future.set_exception(RuntimeError("stream ended"))

    async def __call__(self, n: int) -> None:
        if self._reader.done():
            self._reader.result()
            raise RuntimeError("stream ended")
        request = _request(n)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request.id] = future
        self._queue.put_nowait(request)
        await future

    def close(self) -> None:
        self._stream.cancel()


async def _load(config: dict[str, Any]) -> dict[str, Any]:
    credentials = grpc.ssl_channel_credentials(
        _read(config["root"]), _read(config["key"]), _read(config["crt"]))
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{config['port']}", credentials,
        options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    await channel.channel_ready()
    call = (StreamCaller if config["variant"] == "stream" else unary_caller)(channel)
    clock = time.perf_counter

    async def gather(coroutines: list[Awaitable[None]]) -> None:
        await asyncio.gather(*coroutines)

    result = await measure(config, call, gather, clock)
    if isinstance(call, StreamCaller):
        call.close()
    await channel.close()
    return result


def main(argv: list[str]) -> None:
    if argv[0] == "server":
        asyncio.run(serve(*argv[1:4]))
    elif argv[0] == "client":
        print(json.dumps(asyncio.run(_load(json.loads(argv[1])))), flush=True)
    else:
        raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
