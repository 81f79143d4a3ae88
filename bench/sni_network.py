"""
The processes of the SNI benchmark (:mod:`bench.sni`), each started as its operators
start it, with settings written for the run under ``run/bench-sni/`` and ports chosen
for the run (never the dev network's fixed ports, so ``make demo`` may run beside it):

- **nginx** (Debian's): the one TLS server, with the dev PKI's ``internal-server``
  certificate (``*.internal-server.local``).  One HTTPS port (TLS 1.2 and 1.3) for the
  raw paths, one plain HTTP port with the same files for the terminating private proxy.
  It serves ``/`` (12 bytes) and ``/stream`` (a sparse file of the stream's size).
- **ours**: the public proxy ``public-proxy-1.ga`` and two private proxies as
  ``twistd proxy`` processes, each with its endpoint server (``twistd eps``), reading one
  json directory written here: ``private-proxy-1.ga`` forwards the raw TLS stream to
  nginx's HTTPS port (:data:`RAW_DOMAIN`), ``op-1`` terminates TLS with the same
  certificate and forwards HTTP to nginx's plain port (:data:`TERM_DOMAIN`).  Each
  private proxy's operator announces its domain through its own endpoint server.
- **HAProxy chains**: a router (``req.ssl_sni``, as in the competitors' measurements)
  and a TCP hop, two ``haproxy`` processes, to nginx's HTTPS port; once with default
  buffers and once with ``tune.bufsize 1048576``.  And a terminating chain, like for like
  with our terminating path: the router, then a hop that terminates TLS with the same
  certificate (``bind ... ssl crt``) and forwards HTTP to nginx's plain port.
"""

from __future__ import annotations

import getpass
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from prometheus_client.parser import text_string_to_metric_families

from epsproxy.dev.pki import DevPKI

from .common import free_port as _one_free_port, haproxy_binary, listening, step

__all__ = [
    "CERTS", "RAW_DOMAIN", "TERM_DOMAIN", "RATE_LIMITS", "Process", "Network", "nginx_path",
    "missing_tools",
]

ROOT = Path(__file__).resolve().parent.parent
CERTS = ROOT / "conf" / "dev" / "certs"
RUN_DIR = ROOT / "run" / "bench-sni"
BIN = Path(sys.executable).parent

PUBLIC = "public-proxy-1.ga"
RAW_OPERATOR = "private-proxy-1.ga"
FLOOR_POOL = 64  # pooled connections the floor's back keeps (replaced as they are used)
TERM_OPERATOR = "op-1"
#: The names the client asks for; the internal-server certificate covers both.
RAW_DOMAIN = "raw.internal-server.local"
TERM_DOMAIN = "term.internal-server.local"
#: The public proxy's per-address rate limits for the run: high, so that they are never
#: what is measured (the dev role allows 1,000 a minute).
RATE_LIMITS = [{"type": "second", "limit": 1_000_000}]
#: Connection caps of every listener and forwarder for the run (the idle test holds
#: thousands of connections from one address).
CONNECTION_CAP = 20_000
ALLOWED = [{"service": "proxy", "settings": {"allowed_domains": [".internal-server.local"]}}]
CREATED_AT = "2024-01-01T00:00:00Z"


_TAKEN: set[int] = set()


def free_port() -> int:
    """A free loopback port not yet handed out in this run (the kernel may repeat one)."""
    while True:
        port = _one_free_port()
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def nginx_path() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def missing_tools() -> list[str]:
    """What the benchmark needs and does not find (Debian package names)."""
    missing = []
    if nginx_path() is None:
        missing.append("nginx")
    if shutil.which("curl") is None:
        missing.append("curl")
    if not (CERTS / "root.crt").is_file():
        missing.append("the dev PKI (make certs)")
    return missing


def _pki() -> DevPKI:
    return DevPKI(cert_dir=CERTS, root=CERTS / "root.crt",
                  intermediate=CERTS / "intermediate.crt", directory_file=None)


def tls_block(name: str, **extra: Any) -> dict[str, Any]:
    crt, key = _pki().tls(name)
    return {"ca_certificate_files": [str(CERTS / "root.crt")], "certificate_file": str(crt),
            "key_file": str(key), **extra}


@dataclass
class Process:
    """One process of the run: its argv, log, and the ports that show it is up."""

    name: str
    argv: list[str]
    log: Path
    ports: Sequence[int] = ()
    env: dict[str, str] | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=self.env, start_new_session=True)

    def wait_listening(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not all(listening(port) for port in self.ports):
            assert self.popen is not None
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start (status {self.popen.poll()}):\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def terminate(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self, seconds: float = 15) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.terminate()
        try:
            self.popen.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


def _write_yaml(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(value, sort_keys=False))
    return path


def _twistd(name: str, plugin: str, folder: Path, *args: str) -> list[str]:
    return [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(folder / f"{name}.log"),
            plugin, *args, "--settings", str(folder / name)]


class _Gateway(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:``port`` checking the certificate for ``name`` (the operator)."""

    def __init__(self, name: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(name, port, context=context, timeout=15)
        self._tls = context

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


@dataclass
class Ports:
    """Every port of the run, chosen free at its start."""

    nginx_tls: int = field(default_factory=free_port)
    nginx_http: int = field(default_factory=free_port)
    public_tls: int = field(default_factory=free_port)
    public_internal: int = field(default_factory=free_port)
    public_jsonrpc: int = field(default_factory=free_port)
    public_metrics: int = field(default_factory=free_port)
    eps: dict[str, tuple[int, int]] = field(default_factory=dict)  # name: (peers, gateway)
    private_jsonrpc: dict[str, int] = field(default_factory=dict)
    chains: dict[str, tuple[int, int]] = field(default_factory=dict)  # key: (router, hop)
    floor_tls: int = field(default_factory=free_port)
    floor_pool: int = field(default_factory=free_port)

    def eps_ports(self, name: str) -> tuple[int, int]:
        if name not in self.eps:
            self.eps[name] = (free_port(), free_port())
        return self.eps[name]


_WARM_BUFFER = bytearray(1 << 20)


class Network:
    """
    Every process of one run.  ``start(...)`` brings up what the paths need and checks
    that each path answers; ``stop()`` ends them all.
    """

    def __init__(self, stream_bytes: int, term_stream_bytes: int,
                 folder: Path = RUN_DIR, pool_size: int | None = None,
                 splice_engine: bool = True) -> None:
        self.folder = folder
        #: The private proxies' ``pool_size`` (None: the program's default; 0: no pool).
        self.pool_size = pool_size
        #: The proxies' ``splice_engine`` (False: they splice in Python).
        self.splice_engine = splice_engine
        self.stream_bytes = stream_bytes
        self.term_stream_bytes = term_stream_bytes
        self.ports = Ports()
        self.processes: dict[str, Process] = {}

    # -- nginx ------------------------------------------------------------------------
    def _nginx(self) -> Process:
        folder = self.folder / "nginx"
        www = folder / "www"
        www.mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_bytes(b"hello, sni!\n")
        for name, size in (("stream", self.stream_bytes), ("stream-term", self.term_stream_bytes)):
            with open(www / name, "wb") as f:
                f.truncate(size)  # sparse: no disk, zero pages from the cache
        crt, key = _pki().tls("internal-server")
        user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
        temp = " ".join(f"{kind}_temp_path {folder / kind};" for kind in (
            "client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        config = folder / "nginx.conf"
        config.write_text(f"""
{user}
worker_processes 2;
worker_rlimit_nofile {CONNECTION_CAP * 2};
daemon off;
pid {folder / 'nginx.pid'};
error_log {folder / 'error.log'} warn;
events {{ worker_connections {CONNECTION_CAP}; }}
http {{
    access_log off;
    {temp}
    sendfile on;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    default_type application/octet-stream;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {crt};
    ssl_certificate_key {key};
    ssl_session_cache off;
    ssl_session_tickets off;
    server {{
        listen 127.0.0.1:{self.ports.nginx_tls} ssl backlog=4096;
        listen 127.0.0.1:{self.ports.nginx_http} backlog=4096;
        root {www};
    }}
}}
""")
        return Process("nginx", [nginx_path() or "nginx", "-c", str(config), "-e",
                                 str(folder / "error.log")],
                       self.folder / "nginx.log", (self.ports.nginx_tls, self.ports.nginx_http))

    # -- HAProxy chains ---------------------------------------------------------------
    def _haproxy_chain(self, key: str, bufsize: int, terminating: bool = False) -> list[Process]:
        router, hop = free_port(), free_port()
        domain = TERM_DOMAIN if terminating else RAW_DOMAIN
        self.ports.chains[key] = (router, hop)
        common = ["global", "    maxconn 8000",
                  *([f"    tune.bufsize {bufsize}"] if bufsize else []),
                  "defaults", "    mode tcp", "    timeout connect 5s",
                  "    timeout client 1h", "    timeout server 1h"]
        router_cfg = self.folder / f"{key}-router.cfg"
        router_cfg.write_text("\n".join(common + [
            "frontend router",
            f"    bind 127.0.0.1:{router} backlog 4096",
            "    tcp-request inspect-delay 5s",
            "    tcp-request content accept if { req.ssl_hello_type 1 }",
            f"    use_backend hop if {{ req.ssl_sni -i {domain} }}",
            "backend hop",
            f"    server hop 127.0.0.1:{hop}",
            ""]))
        hop_cfg = self.folder / f"{key}-hop.cfg"
        if terminating:
            # HAProxy wants the key beside the certificate in one file.
            crt, tls_key = _pki().tls("internal-server")
            pem = self.folder / f"{key}.pem"
            pem.write_bytes(crt.read_bytes() + tls_key.read_bytes())
            pem.chmod(0o600)
            hop_lines = [
                "frontend hop",
                "    mode http",
                "    timeout http-keep-alive 1h",
                f"    bind 127.0.0.1:{hop} backlog 4096 ssl crt {pem}",
                "    default_backend server",
                "backend server",
                "    mode http",
                f"    server nginx 127.0.0.1:{self.ports.nginx_http}",
                ""]
        else:
            hop_lines = [
                "frontend hop",
                f"    bind 127.0.0.1:{hop} backlog 4096",
                "    default_backend server",
                "backend server",
                f"    server nginx 127.0.0.1:{self.ports.nginx_tls}",
                ""]
        hop_cfg.write_text("\n".join(common + hop_lines))
        binary = haproxy_binary() or "haproxy"
        return [Process(f"{key}-router", [binary, "-f", str(router_cfg), "-db"],
                        self.folder / f"{key}-router.log", (router,)),
                Process(f"{key}-hop", [binary, "-f", str(hop_cfg), "-db"],
                        self.folder / f"{key}-hop.log", (hop,))]

    # -- ours -------------------------------------------------------------------------
    def _directory(self, private: Sequence[str]) -> None:
        pki = _pki()
        records: list[dict[str, Any]] = []

        def add(name: str, section: str, data: Any) -> None:
            records.append({"name": name, "section": section, "data": data,
                            "created_at": CREATED_AT})

        operators = [PUBLIC, *private]
        for name in operators:
            add(name, "certificates", [{"fingerprint": pki.fingerprints(name)["encryption"],
                                        "key_usage": "encryption"}])
            add(name, "channels", [{"type": "eps_client"}, {"type": "eps_server", "settings": {
                "address": f"127.0.0.1:{self.ports.eps_ports(name)[0]}"}}])
        add(PUBLIC, "groups", ["proxy-providers"])
        add(PUBLIC, "services", [{
            "name": "proxy", "permissions": [{"group": "proxy-users", "rights": ["call"]}],
            "methods": [{"name": m, "permissions": []}
                        for m in ("announceConnections", "getAnnouncements",
                                  "requestPoolTokens")]}])
        for name in private:
            # The private proxy's operator announces its own domain (it is also in the
            # group that may call announceConnection, and its settings allow the suffix).
            add(name, "groups", ["proxy-users", "announcers"])
            add(name, "settings", ALLOWED)
            add(name, "services", [
                {"name": "incoming",
                 "permissions": [{"group": "proxy-providers", "rights": ["call"]}],
                 "methods": [{"name": "incomingConnection", "permissions": []}]},
                {"name": "announcing",
                 "permissions": [{"group": "announcers", "rights": ["call"]}],
                 "methods": [{"name": m, "permissions": []}
                             for m in ("announceConnection", "getAnnouncements")]}])
        directory = self.folder / "directory"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "001.json").write_text(json.dumps({"records": records}, indent=1))

    def _eps(self, name: str, local: dict[str, Any]) -> Process:
        peers, gateway = self.ports.eps_ports(name)
        role = f"eps-{name}"
        _write_yaml(self.folder / role / "eps.yml", {
            "name": name,
            "directory": {"type": "json", "settings": {"path": str(self.folder / "directory")}},
            "channels": [
                {"name": "local", "type": "jsonrpc_client", "settings": local},
                {"name": "eps-server", "type": "eps_server", "settings": {
                    "bind_address": f"127.0.0.1:{peers}", "tls": tls_block(name)}},
                {"name": "eps-client", "type": "eps_client", "settings": {"tls": tls_block(name)}},
                {"name": "gateway", "type": "jsonrpc_server", "settings": {
                    "bind_address": f"127.0.0.1:{gateway}", "tls": tls_block(name)}},
            ],
        })
        return Process(role, _twistd(role, "eps", self.folder), self.folder / f"{role}.out",
                       (peers, gateway))

    def _public(self) -> Process:
        p = self.ports
        caps = {"max_connections": CONNECTION_CAP, "max_connections_per_address": CONNECTION_CAP}
        _write_yaml(self.folder / "public-proxy" / "proxy.yml", {
            "public": {
                "name": PUBLIC,
                "datastore": {"type": "embedded", "settings": {
                    "path": str(self.folder / "public-proxy.sqlite")}},
                "tls_bind_address": f"127.0.0.1:{p.public_tls}",
                "internal_bind_address": f"127.0.0.1:{p.public_internal}",
                "internal_endpoint": f"127.0.0.1:{p.public_internal}",
                "tcp_rate_limits": RATE_LIMITS,
                "splice_engine": self.splice_engine,
                **{f"tls_{k}": v for k, v in caps.items()},
                **{f"internal_{k}": v for k, v in caps.items()},
                "shutdown_grace": 0,
                "jsonrpc_server": {"bind_address": f"127.0.0.1:{p.public_jsonrpc}",
                                   "tls": tls_block(PUBLIC)},
                "jsonrpc_client": {
                    "endpoint": f"https://127.0.0.1:{p.eps_ports(PUBLIC)[1]}/jsonrpc",
                    "server_name": PUBLIC, "timeout": 10, "tls": tls_block(PUBLIC)},
            },
            "metrics": {"bind_address": f"127.0.0.1:{p.public_metrics}"},
        })
        return Process("public-proxy", _twistd("public-proxy", "proxy", self.folder,
                                               "--mode", "public"),
                       self.folder / "public-proxy.out",
                       (p.public_tls, p.public_internal, p.public_jsonrpc))

    def _private(self, name: str, terminating: bool) -> Process:
        port = self.ports.private_jsonrpc.setdefault(name, free_port())
        if terminating:
            endpoint: dict[str, Any] = {
                "address": f"127.0.0.1:{self.ports.nginx_http}", "timeout": 60,
                "tls": tls_block("internal-server", verify_client=False),
                "max_response_bytes": self.term_stream_bytes + 65536}
        else:
            endpoint = {"address": f"127.0.0.1:{self.ports.nginx_tls}"}
        role = f"private-proxy-{name}"
        _write_yaml(self.folder / role / "proxy.yml", {"private": {
            "name": name,
            "datastore": {"type": "embedded", "settings": {
                "path": str(self.folder / f"{role}.sqlite")}},
            "jsonrpc_server": {"bind_address": f"127.0.0.1:{port}"},
            "jsonrpc_client": {
                "endpoint": f"https://127.0.0.1:{self.ports.eps_ports(name)[1]}/jsonrpc",
                "server_name": name, "timeout": 10, "tls": tls_block(name)},
            "internal_endpoint": endpoint,
            "max_connections": CONNECTION_CAP,
            "shutdown_grace": 0,
            "splice_engine": self.splice_engine,
            **({} if self.pool_size is None else {"pool_size": self.pool_size}),
        }})
        return Process(role, _twistd(role, "proxy", self.folder, "--mode", "private"),
                       self.folder / f"{role}.out", (port,))

    # -- the floor: plain Python on the pooled path (bench/sni_floor.py) ------------------
    def _floor(self) -> list[Process]:
        floor = [sys.executable, "-m", "bench.sni_floor"]
        return [
            Process("floor-front", floor + ["front", str(self.ports.floor_tls),
                                            str(self.ports.floor_pool)],
                    self.folder / "floor-front.out",
                    (self.ports.floor_tls, self.ports.floor_pool)),
            Process("floor-back", floor + ["back", str(self.ports.floor_pool),
                                           str(self.ports.nginx_tls), str(FLOOR_POOL)],
                    self.folder / "floor-back.out"),
        ]

    def _ours(self, raw: bool, term: bool) -> list[Process]:
        private = ([RAW_OPERATOR] if raw else []) + ([TERM_OPERATOR] if term else [])
        self._directory(private)
        processes = [self._public(), self._eps(PUBLIC, {
            "endpoint": f"https://127.0.0.1:{self.ports.public_jsonrpc}/jsonrpc",
            "timeout": 10, "server_name": PUBLIC, "tls": tls_block(PUBLIC)})]
        for name in private:
            proxy = self._private(name, terminating=name == TERM_OPERATOR)
            processes += [proxy, self._eps(name, {
                "endpoint": f"http://127.0.0.1:{self.ports.private_jsonrpc[name]}/jsonrpc",
                "timeout": 10})]
        return processes

    def announce(self, operator: str, domain: str, seconds: float = 60) -> None:
        """``operator`` announces ``domain`` at the public proxy (retried while links form)."""
        gateway = self.ports.eps_ports(operator)[1]
        crt, key = _pki().tls(operator)
        context = ssl.create_default_context(cafile=str(CERTS / "root.crt"))
        context.load_cert_chain(str(crt), str(key))
        body = json.dumps({"jsonrpc": "2.0", "id": 1,
                           "method": f"{operator}.announceConnection",
                           "params": {"proxy": PUBLIC, "domain": domain}})
        deadline = time.monotonic() + seconds
        last: Any = None
        while time.monotonic() < deadline:
            connection = _Gateway(operator, gateway, context)
            try:
                connection.request("POST", "/jsonrpc", body,
                                   {"Content-Type": "application/json"})
                last = json.loads(connection.getresponse().read())
                if isinstance(last, dict) and last.get("result") == "ok":
                    return
            except (OSError, ValueError, http.client.HTTPException) as e:
                last = e
            finally:
                connection.close()
            time.sleep(0.2)
        raise RuntimeError(f"{operator} could not announce {domain}: {last}")

    # -- the run ----------------------------------------------------------------------
    def start(self, paths: Sequence[str]) -> None:
        """Start what ``paths`` (keys of :data:`bench.sni.PATHS`) need, nginx first."""
        paths = list(dict.fromkeys(paths))  # a path named twice is started once
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        wanted = [self._nginx()]
        for key in paths:
            if key.startswith("haproxy"):
                wanted += self._haproxy_chain(key, 1048576 if key.endswith("1m") else 0,
                                              terminating=key.endswith("term"))
        if "ours-raw" in paths or "ours-term" in paths:
            wanted += self._ours("ours-raw" in paths, "ours-term" in paths)
        if "floor" in paths:
            wanted += self._floor()
        for process in wanted:
            self.processes[process.name] = process
            step(f"starting {process.name}")
            process.start()
        for process in wanted:
            process.wait_listening()
        for key, operator, domain in (("ours-raw", RAW_OPERATOR, RAW_DOMAIN),
                                      ("ours-term", TERM_OPERATOR, TERM_DOMAIN)):
            if key in paths:
                self.announce(operator, domain)
        for key, operator in (("ours-raw", RAW_OPERATOR), ("ours-term", TERM_OPERATOR)):
            if key in paths and self.pool_size != 0:
                idle = self.wait_for_pool(operator)
                step(f"{operator}'s connection pool at the public proxy: {idle:.0f} idle"
                     + ("" if idle else " (it did not fill: connections are brokered)"))

    def warm_stream_files(self) -> None:
        """
        Read nginx's stream files once, so that no path's first stream pays for filling
        the page cache (a sparse 1 GB file: the first stream through a fresh nginx made
        346-363 MB/s, the next ones 460-650, on 2026-12-04).
        """
        for name in ("stream", "stream-term"):
            path = self.folder / "nginx" / "www" / name
            if path.exists():
                with open(path, "rb") as f:
                    while f.readinto(_WARM_BUFFER):
                        pass

    def pids(self, key: str, brokering: bool = False) -> list[int]:
        """
        The proxy processes of path ``key`` (ours: public + private proxy; HAProxy: router
        + hop); with ``brokering``, ours adds the two endpoint servers that carry each new
        connection's brokering calls.
        """
        if key.startswith("ours"):
            operator = RAW_OPERATOR if key == "ours-raw" else TERM_OPERATOR
            names = ["public-proxy", f"private-proxy-{operator}"]
            if brokering:
                names += [f"eps-{PUBLIC}", f"eps-{operator}"]
        elif key.startswith("haproxy"):
            names = [f"{key}-router", f"{key}-hop"]
        elif key == "floor":
            names = ["floor-front", "floor-back"]
        else:
            names = []
        return [self.processes[n].pid for n in names]

    def port(self, key: str) -> int:
        """The port a client dials for path ``key``."""
        if key == "direct":
            return self.ports.nginx_tls
        if key.startswith("ours"):
            return self.ports.public_tls
        if key == "floor":
            return self.ports.floor_tls
        return self.ports.chains[key][0]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """
        The sum of the samples ``name`` (with ``labels`` among theirs) on the public
        proxy's metrics port (0 when absent); ``name`` may carry labels in the exposition's
        own syntax (``name{outcome="x"}``), matched as text.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.ports.public_metrics,
                                                timeout=10)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        if labels is None:
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith(name) and not line.startswith("#"))
        return sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == name
                   and all(sample.labels.get(k) == v for k, v in labels.items()))

    def wait_for_pool(self, operator: str, seconds: float = 30) -> float:
        """
        Wait until the public proxy holds an idle pooled connection of ``operator``
        (issue 14) or ``seconds`` passed; the idle count then (0: no pool, brokered only).
        """
        deadline = time.monotonic() + seconds
        while True:
            idle = self.metric("proxy_pool_connections", {"operator": operator, "state": "idle"})
            if idle > 0 or time.monotonic() > deadline:
                return idle
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to all at once (each drains in parallel), then wait for each."""
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            started = time.monotonic()
            process.stop()
            if time.monotonic() - started > 2:
                step(f"{process.name} took {time.monotonic() - started:.1f} s to stop")
