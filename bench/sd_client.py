"""
Load generator for the SD benchmark (a separate process, so client CPU does not count
against the server): ``IN_FLIGHT`` loops calling ``getRecords`` for ``DURATION`` seconds.
Prints ``{"calls", "seconds", "latencies"}`` as JSON.
"""

from __future__ import annotations

import json
import sys
import time

from twisted.internet import defer, task

from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient


async def run(reactor, port, root, crt, key, params, duration, in_flight):
    client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({
        "endpoint": f"https://127.0.0.1:{port}/jsonrpc", "server_name": "sd-1",
        "tls": {"ca_certificate_files": [root], "certificate_file": crt, "key_file": key},
    }))
    latencies: list[float] = []
    await client.call("getRecords", params)  # warm the connection pool
    deadline = time.monotonic() + duration

    async def loop():
        while time.monotonic() < deadline:
            started = time.monotonic()
            await client.call("getRecords", params)
            latencies.append(time.monotonic() - started)

    started = time.monotonic()
    await defer.gatherResults([defer.ensureDeferred(loop()) for _ in range(in_flight)])
    seconds = time.monotonic() - started
    await client.close()
    print(json.dumps({"calls": len(latencies), "seconds": seconds, "latencies": latencies}))


def main() -> None:
    port, root, crt, key, params, duration, in_flight = sys.argv[1:8]
    task.react(lambda reactor: defer.ensureDeferred(run(
        reactor, int(port), root, crt, key, json.loads(params), float(duration), int(in_flight))))


if __name__ == "__main__":
    main()
