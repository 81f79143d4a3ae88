"""
Service directory benchmark.

1. Verify 10,000 chained, signed records (``RecordLog.add``, the work an SD does when it
   loads its store, and ``VerifiedChain.extend``, what a directory client does): CPU s.
2. Cold start of a real ``twistd sd`` whose store holds those records: wall and CPU
   seconds until it serves.
3. ``getRecords`` calls per second against that SD over mutual TLS with keep-alive
   (16 calls in flight), for an up-to-date client (``after`` = tip, empty answer) and for
   one 100 records behind; p50/p99 latency.  Beside it, in the same run, a bare
   ``twisted.web`` server over the same TLS that answers a constant JSON-RPC reply with
   no work at all: the ceiling for this transport.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from epsproxy.rules import records
from epsproxy.rules.certificates import load_certificates_file, load_private_key_file, to_pem
from epsproxy.directory.chain import RecordLog, VerifiedChain
from epsproxy.dev.pki import create_pki

from .common import cpu_seconds, percentile, step, table

RECORDS = int(os.environ.get("BENCH_RECORDS", "10000"))
DURATION = float(os.environ.get("BENCH_DURATION", "5"))
IN_FLIGHT = 16
TWISTD = str(Path(sys.executable).parent / "twistd")


def make_chain(pki, count: int) -> list[dict]:
    """``count`` chained records signed by hd-1, starting with hd-1's key pin."""
    crt, key_file = pki.signing("hd-1")
    key = load_private_key_file(key_file)
    pem = to_pem(load_certificates_file(crt)[0])
    changes = [{
        "name": "hd-1", "section": "certificates", "created_at": "2026-01-01T00:00:00Z",
        "data": [{"fingerprint": pki.fingerprints("hd-1")["signing"], "key_usage": "signing"}],
    }]
    for i in range(1, count):
        changes.append({
            "name": f"op-{i % 500}", "section": "groups" if i % 2 else "channels",
            "created_at": f"2026-01-01T00:00:{i % 60:02d}.{i:09d}Z",
            "data": [f"group-{i}"] if i % 2 else
            [{"type": "eps_server", "settings": {"address": f"localhost:{1000 + i}"}}],
        })
    chain, parent = [], ""
    for change in changes:
        signed = records.sign_record(change, parent, key, pem)
        chain.append(signed)
        parent = signed["hash"]
    return chain


def write_store(path: Path, chain: list[dict]) -> None:
    """Bulk-write the records into an embedded store file (one transaction)."""
    from epsproxy.store.embedded import _connect

    conn = _connect(path)
    with conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO entries (type, id, data) VALUES (1, ?, ?)",
            [(os.urandom(16), json.dumps(r, separators=(",", ":")).encode()) for r in chain],
        )
        conn.execute("COMMIT")
    conn.close()


def sd_settings(folder: Path, pki, store: Path) -> Path:
    crt, key = pki.tls("sd-1")
    settings = {
        "jsonrpc_server": {
            "bind_address": "127.0.0.1:0",
            "tls": {"ca_certificate_files": [str(pki.root)], "certificate_file": str(crt),
                    "key_file": str(key)},
        },
        "directory": {
            "datastore": {"type": "embedded", "settings": {"path": str(store)}},
            "ca_certificate_files": [str(pki.root)],
            "ca_intermediate_certificate_files": [str(pki.intermediate)],
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sd.yml").write_text(yaml.safe_dump(settings))
    return folder


def start_sd(settings: Path) -> tuple[subprocess.Popen, int, float, float]:
    """Start ``twistd sd``; returns (process, port, wall seconds to ready, CPU seconds)."""
    log = settings / "twistd.log"
    start = time.monotonic()
    process = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "sd"], env=dict(os.environ, SD_SETTINGS=str(settings)),
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd="/",
    )
    pattern = re.compile(rb"serving (\d+) verified record\(s\) at [\d.]+:(\d+)")
    while True:
        match = pattern.search(log.read_bytes())
        if match:
            wall = time.monotonic() - start
            return process, int(match.group(2)), wall, cpu_seconds(process.pid)
        if process.poll() is not None:
            raise RuntimeError(f"twistd sd exited:\n{log.read_text(errors='replace')}")
        time.sleep(0.01)


BASELINE = r'''
import json
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site
from epsproxy.net.tls import listen_endpoint
tls = {"ca_certificate_files": [sys.argv[1]], "certificate_file": sys.argv[2], "key_file": sys.argv[3]}
class R(Resource):
    isLeaf = True
    def render_POST(self, request):
        call = json.loads(request.content.read())
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return json.dumps({"jsonrpc": "2.0", "result": [], "id": call.get("id")}).encode()
def listening(port):
    print("listening on", port.getHost().port, flush=True)
listen_endpoint(reactor, "127.0.0.1:0", tls).listen(Site(R())).addCallback(listening)
reactor.run()
'''


def start_baseline(pki) -> tuple[subprocess.Popen, int]:
    crt, key = pki.tls("sd-1")
    process = subprocess.Popen(
        [sys.executable, "-c", BASELINE, str(pki.root), str(crt), str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(rb"listening on (\d+)", line)
    if not match:
        raise RuntimeError(f"baseline server failed: {line!r}")
    return process, int(match.group(1))


def load(pki, port: int, params: dict) -> tuple[float, float, float]:
    """Run the client load in a child process; returns (calls/s, p50 ms, p99 ms)."""
    crt, key = pki.tls("hd-1")
    result = subprocess.run(
        [sys.executable, "-m", "bench.sd_client", str(port), str(pki.root), str(crt), str(key),
         json.dumps(params), str(DURATION), str(IN_FLIGHT)],
        capture_output=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )
    data = json.loads(result.stdout)
    latencies = data["latencies"]
    return data["calls"] / data["seconds"], percentile(latencies, 0.5) * 1e3, \
        percentile(latencies, 0.99) * 1e3



def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="epsproxy-bench-sd-"))
    pki = create_pki(base / "certs", directory_dir=base / "directory")
    trust = records.TrustStore.from_files([pki.root], [pki.intermediate])

    step(f"signing {RECORDS:,} records")
    started = time.process_time()
    chain = make_chain(pki, RECORDS)
    sign_cpu = time.process_time() - started

    started = time.process_time()
    log = RecordLog(trust)
    log.add(chain)
    log_cpu = time.process_time() - started
    assert len(log.selected.records) == RECORDS, "not every record verified"

    started = time.process_time()
    VerifiedChain(trust).extend(chain)
    extend_cpu = time.process_time() - started

    step("starting twistd sd on the stored records")
    store = base / "sd" / "records.sqlite"
    write_store(store, chain)
    settings = sd_settings(base / "sd", pki, store)
    process, port, wall, cpu = start_sd(settings)
    baseline, baseline_port = start_baseline(pki)
    try:
        step("measuring getRecords")
        tip = chain[-1]["hash"]
        behind = chain[-101]["hash"]
        up_to_date = load(pki, port, {"after": tip})
        hundred = load(pki, port, {"after": behind})
        ceiling = load(pki, baseline_port, {"after": tip})
    finally:
        for p in (process, baseline):
            p.terminate()
            p.wait()

    print(f"{RECORDS:,} chained records signed by one sd-admin (signing them: {sign_cpu:.2f} s CPU)\n")
    print(table(
        ["step", "CPU s", "goal"],
        [
            [f"RecordLog.add({RECORDS:,}) — SD load + verify", f"{log_cpu:.2f}", "< 2 s"],
            [f"VerifiedChain.extend({RECORDS:,}) — directory client", f"{extend_cpu:.2f}", "< 2 s"],
            [f"twistd sd cold start with {RECORDS:,} records (wall {wall:.2f} s)", f"{cpu:.2f}", ""],
        ],
    ))
    print()
    print(table(
        ["server", "request", f"calls/s ({IN_FLIGHT} in flight)", "p50 ms", "p99 ms"],
        [
            ["epsproxy sd", "getRecords after tip (empty)", f"{up_to_date[0]:,.0f}",
             f"{up_to_date[1]:.2f}", f"{up_to_date[2]:.2f}"],
            ["epsproxy sd", "getRecords, 100 behind", f"{hundred[0]:,.0f}",
             f"{hundred[1]:.2f}", f"{hundred[2]:.2f}"],
            ["bare twisted.web, same TLS (ceiling)", "constant reply", f"{ceiling[0]:,.0f}",
             f"{ceiling[1]:.2f}", f"{ceiling[2]:.2f}"],
        ],
    ))
