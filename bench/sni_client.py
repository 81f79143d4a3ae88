"""
The load client of the SNI benchmark: ``python -m bench.sni_client MODE CONFIG_JSON``.

``rate``: ``clients`` worker processes (each with its own ``ssl.SSLContext``: no shared
state, no session resumption) each connect, complete a TLS handshake that sends SNI and
verifies the server's certificate for that name against the dev root, and close, over and
over for ``warmup`` + ``seconds``.  Only connections started after the warm-up and done
before the end count.  Prints one JSON line: ``connections``, ``errors``, ``seconds``,
``p50_ms``, ``p99_ms`` (connect + handshake), ``cpu`` (the workers' CPU seconds in the
counted window), ``completed`` (connections done, warm-up included) and the first error
seen.

``idle``: opens ``count`` such connections (8 at a time) and keeps them open, silent;
prints ``ready`` (or ``failed <error>``), closes them all when a line arrives on stdin,
then prints ``closed``.

OpenSSL 3.0's ``s_time`` cannot send SNI, hence this client; its own ceiling is the
benchmark's "direct" row.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["connect", "rate", "idle", "main"]


def context(cafile: str) -> ssl.SSLContext:
    """A client context that verifies the name it is asked for (no session reuse)."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.options |= ssl.OP_NO_TICKET
    return ctx


def connect(ctx: ssl.SSLContext, port: int, sni: str, timeout: float = 20) -> ssl.SSLSocket:
    """A TCP connection to 127.0.0.1:``port`` with a completed, verified handshake."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


def _worker(config: dict[str, Any], start: float, pipe: Connection) -> None:
    ctx = context(config["cafile"])
    port, sni = config["port"], config["sni"]
    counted_from = start + config["warmup"]
    end = counted_from + config["seconds"]
    latencies: list[float] = []
    errors = completed = 0
    first_error = ""
    cpu_start: float | None = None
    now = time.monotonic()
    if now < start:
        time.sleep(start - now)
    while True:
        began = time.monotonic()
        if began >= end:
            break
        if cpu_start is None and began >= counted_from:
            cpu_start = time.process_time()
        try:
            sock = connect(ctx, port, sni)
            sock.close()
        except (OSError, ssl.SSLError) as e:
            if began >= counted_from:
                errors += 1
                first_error = first_error or repr(e)
            continue
        done = time.monotonic()
        completed += 1
        if began >= counted_from and done <= end:
            latencies.append(done - began)
    cpu = time.process_time() - cpu_start if cpu_start is not None else 0.0
    pipe.send({"latencies": latencies, "errors": errors, "error": first_error, "cpu": cpu,
               "completed": completed})
    pipe.close()


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def rate(config: dict[str, Any]) -> dict[str, Any]:
    """Connections per second with ``clients`` concurrent clients (see the module doc)."""
    forked = multiprocessing.get_context("fork")
    # Workers start together, a moment after all of them exist.
    start = time.monotonic() + 0.2 + 0.02 * config["clients"]
    pipes, workers = [], []
    for _ in range(config["clients"]):
        mine, theirs = forked.Pipe(duplex=False)
        worker = forked.Process(target=_worker, args=(config, start, theirs), daemon=True)
        worker.start()
        theirs.close()
        pipes.append(mine)
        workers.append(worker)
    results = [pipe.recv() for pipe in pipes]
    for worker in workers:
        worker.join()
    latencies = [value for r in results for value in r["latencies"]]
    return {"connections": len(latencies), "errors": sum(r["errors"] for r in results),
            "seconds": config["seconds"], "p50_ms": _percentile(latencies, 0.50) * 1e3,
            "p99_ms": _percentile(latencies, 0.99) * 1e3,
            "cpu": sum(r["cpu"] for r in results),
            "completed": sum(r["completed"] for r in results),
            "error": next((r["error"] for r in results if r["error"]), "")}


def idle(config: dict[str, Any]) -> None:
    """Hold ``count`` idle TLS connections until told to close them (see the module doc)."""
    ctx = context(config["cafile"])
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(connect, ctx, config["port"], config["sni"])
                   for _ in range(config["count"])]
        held, failures = [], []
        for future in futures:
            try:
                held.append(future.result())
            except (OSError, ssl.SSLError) as e:
                failures.append(repr(e))
    print(f"failed {len(failures)} {failures[0]}" if failures else "ready", flush=True)
    sys.stdin.readline()
    for sock in held:
        sock.close()
    print("closed", flush=True)


#: The keys each mode's config must have.
REQUIRED = {"rate": ("cafile", "port", "sni", "clients", "seconds", "warmup"),
            "idle": ("cafile", "port", "sni", "count")}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in REQUIRED:
        raise SystemExit(f"usage: python -m bench.sni_client {{{'|'.join(REQUIRED)}}} "
                         "CONFIG_JSON")
    mode = argv[0]
    try:
        config = json.loads(argv[1])
    except ValueError as e:
        raise SystemExit(f"CONFIG_JSON is not JSON: {e}") from None
    missing = [k for k in REQUIRED[mode] if not isinstance(config, dict) or k not in config]
    if missing:
        raise SystemExit(f"CONFIG_JSON lacks {', '.join(missing)}")
    if mode == "rate":
        print(json.dumps(rate(config)), flush=True)
    else:
        idle(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
