"""
The dev network on one machine: what ``make demo``, ``make stop`` and ``make sd-setup`` run.

``start`` launches every role of the dev network as its own ``twistd -n`` process (as an
operator would start it), with logs and pid files under the run folder, waits until each
answers (no fixed sleeps), loads the dev directory into the SD, and shows what the
network now knows.  ``stop`` ends what ``start`` started.  Running ``start`` twice in a
row stops the old processes first.

This is a plain synchronous script on purpose: it only drives processes and makes a few
HTTPS calls with the standard library, so it needs nothing that the roles need.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "dev"
CERTS = CONF / "certs"
DIRECTORY = CONF / "directory"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Role:
    """One process of the dev network."""

    name: str
    plugin: str
    env_var: str
    port: int
    server_name: str
    args: tuple[str, ...] = ()
    #: The JSON-RPC method that shows the role is up (any JSON-RPC reply counts).
    probe: str = "getTip"
    #: A plain command instead of a twistd plugin (the example services).
    command: tuple[str, ...] = ()

    @property
    def settings(self) -> Path:
        return CONF / "roles" / self.name


def _eps(name: str, port: int, operator: str) -> Role:
    return Role(name, "eps", "EPS_SETTINGS", port, operator, probe=f"{operator}._ping")


#: The dev network in start order (SPEC §21.3); endpoint servers start after the
#: directory is loaded, so they know their peers from the first second.
SD_ROLES = (Role("sd-1", "sd", "SD_SETTINGS", 3322, "sd-1"),)
EPS_ROLES = (
    Role("public-proxy-1", "proxy", "PROXY_SETTINGS", 6655, "public-proxy-1.ga",
         args=("--mode", "public"), probe="requestConnection"),
    Role("locations", "", "", 6666, "", probe="lookup",
         command=("-m", "epsproxy.dev.examples.locations", "--bind", "localhost:6666")),
    _eps("ls-1", 5557, "ls-1"),
    _eps("public-proxy-eps-1", 5544, "public-proxy-1.ga"),
    _eps("private-proxy-eps-1", 7766, "private-proxy-1.ga"),
    _eps("hd-2", 3334, "hd-2"),
    _eps("hd-1", 5555, "hd-1"),
    Role("internal-server", "", "", 7777, "", probe="-",
         command=("-m", "epsproxy.dev.examples.internal_server", "--bind", "localhost:7777")),
    Role("private-proxy-1", "proxy", "PROXY_SETTINGS", 8877, "",
         args=("--mode", "private"), probe="getAnnouncements"),
)
ROLES = SD_ROLES + EPS_ROLES


class DemoError(Exception):
    """Something the person running the demo must know about; printed as one line."""


def _pid_file(run_dir: Path, role: Role) -> Path:
    return run_dir / f"{role.name}.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            finished = 0
        if finished == pid or not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def stop(run_dir: Path) -> None:
    """Stop every role started from ``run_dir`` (SIGTERM, then SIGKILL after 10 s)."""
    for role in reversed(ROLES):
        pid_file = _pid_file(run_dir, role)
        if not pid_file.exists():
            continue
        try:
            pid = int(pid_file.read_text().strip())
        except ValueError:
            pid_file.unlink()
            continue
        if _alive(pid):
            os.killpg(pid, signal.SIGTERM)
            if not _wait_gone(pid, 10):
                os.killpg(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
            print(f"stopped {role.name} (pid {pid})")
        pid_file.unlink()


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(CERTS / "root.crt"))
    context.load_cert_chain(str(CERTS / "hd-1.crt"), str(CERTS / "hd-1.key"))
    return context


class _ResolvedHTTPS(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 that checks the certificate for ``host`` (like curl's --resolve)."""

    def __init__(self, host: str, port: int, *, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(host, port, context=context, timeout=timeout)
        self._tls = context  # the base class keeps its own copy under an undocumented name

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)


def call(port: int, server_name: str, method: str, params: dict, timeout: float = 5) -> dict:
    """
    One JSON-RPC call over HTTPS with hd-1's client certificate (plain HTTP when
    ``server_name`` is empty); returns the reply.
    """
    if server_name:
        connection: http.client.HTTPConnection = _ResolvedHTTPS(
            server_name, port, context=_client_context(), timeout=timeout
        )
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    try:
        connection.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def _start_role(
    run_dir: Path, role: Role, overlays: Mapping[str, Path] | None = None
) -> subprocess.Popen:
    """
    Start ``role`` with its settings folder; ``overlays`` maps role names to one more
    settings folder merged after it (harnesses such as ``make chaos-redis`` use this to
    run the same network with other settings without changing conf/dev).
    """
    log = run_dir / f"{role.name}.log"
    if role.command:
        env = dict(os.environ)
        command = [sys.executable, *role.command]
    else:
        settings = [str(role.settings)]
        if overlays and role.name in overlays:
            settings.append(str(overlays[role.name]))
        env = dict(os.environ, **{role.env_var: ":".join(settings)})
        command = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log), role.plugin,
                   *role.args]
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
        stdout=open(run_dir / f"{role.name}.out", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _pid_file(run_dir, role).write_text(f"{process.pid}\n")
    return process


def _wait_ready(run_dir: Path, role: Role, process: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = (run_dir / f"{role.name}.out").read_text(errors="replace")
            log = run_dir / f"{role.name}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise DemoError(f"{role.name} exited with status {process.returncode}:\n{output}{tail}")
        try:
            call(role.port, role.server_name, role.probe, {}, timeout=2)
            print(f"{role.name} is ready on port {role.port} (pid {process.pid})")
            return
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError):
            time.sleep(0.1)
    raise DemoError(f"{role.name} did not answer on port {role.port} within {seconds:.0f} s; "
                    f"see {run_dir / (role.name + '.log')}")


def sd_setup() -> None:
    """Load conf/dev/directory/*.json into the SD in name order, the first as a reset."""
    files = sorted(DIRECTORY.glob("*.json"))
    if not files:
        raise DemoError(f"no directory files in {DIRECTORY}")
    env = dict(os.environ, EPS_SETTINGS=str(CONF / "roles" / "hd-1"))
    for index, path in enumerate(files):
        command = [str(BIN / "eps"), "sd", "submit-records"]
        if index == 0:
            command.append("--reset")
        command.append(str(path))
        print(f"loading {path.relative_to(ROOT)}")
        result = subprocess.run(command, env=env, cwd=ROOT)
        if result.returncode != 0:
            raise DemoError(f"loading {path.name} failed (see the message above)")


def show_directory() -> None:
    reply = call(3322, "sd-1", "getEntries", {})
    if "error" in reply:
        raise DemoError(f"getEntries failed: {reply['error']}")
    print("\nThe service directory now lists:")
    for entry in reply["result"]:
        channels = ", ".join(
            c["type"] + (f" {c['settings']['address']}" if (c.get("settings") or {}).get("address") else "")
            for c in entry["channels"]
        ) or "-"
        services = ", ".join(s["name"] for s in entry["services"]) or "-"
        keys = {c["key_usage"]: c["fingerprint"][:12] for c in entry["certificates"]}
        print(f"  {entry['name']:<20} groups: {', '.join(entry['groups']) or '-'}")
        print(f"  {'':<20} channels: {channels}; services: {services}")
        print(f"  {'':<20} fingerprints: signing {keys.get('signing', '-')}…, "
              f"encryption {keys.get('encryption', '-')}…")
    print(
        "\nAsk it yourself:\n  curl --cert conf/dev/certs/hd-1.crt --key conf/dev/certs/hd-1.key "
        "--cacert conf/dev/certs/root.crt --resolve sd-1:3322:127.0.0.1 "
        "https://sd-1:3322/jsonrpc -H 'Content-Type: application/json' "
        "-d '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"getEntries\",\"params\":{}}'"
    )


def getting_started() -> None:
    """The reference's getting-started flow: hd-1's gateway calls ls-1.add, then lookup."""
    print("\nGetting started: hd-1's applications call the location service ls-1 "
          "through hd-1's endpoint server (localhost:5555):")
    for method, params in (("ls-1.add", {"name": "Berlin", "id": "loc-berlin-1"}),
                           ("ls-1.lookup", {"name": "Berlin"})):
        reply = call(5555, "hd-1", method, params, timeout=15)
        print(f"  {method} {json.dumps(params)}\n    -> {json.dumps(reply)}")
        if "error" in reply:
            raise DemoError(f"{method} failed: {reply['error']}")
    print(
        "\nAsk it yourself:\n  curl --cert conf/dev/certs/hd-1.crt --key conf/dev/certs/hd-1.key "
        "--cacert conf/dev/certs/root.crt --resolve hd-1:5555:127.0.0.1 "
        "https://hd-1:5555/jsonrpc -H 'Content-Type: application/json' "
        "-d '{\"jsonrpc\":\"2.0\",\"id\":\"1\",\"method\":\"ls-1.lookup\","
        "\"params\":{\"name\":\"Berlin\"}}'"
    )


def metric(port: int, name: str, labels: str = "") -> float | None:
    """One sample from a Prometheus endpoint on localhost, or None."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return None


def wait_for(what: str, check: Callable[[], object], seconds: float = 30) -> None:
    """Poll ``check()`` until it is true (a readiness condition, not a fixed sleep)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not happen within {seconds:.0f} s")
        time.sleep(0.1)


#: Metrics ports of the dev roles (conf/dev/roles/*/).
PROXY_METRICS = 2114
PROXY_EPS_METRICS = 2115
#: The public proxy's counter of spliced pairs.
PAIRINGS = "proxy_pairings_total"


def peer_to_peer() -> None:
    """SPEC §21.4: hd-1's gateway asks for hd-2._ping; hd-2 is reachable only via the proxy."""
    print("\nPeer to peer: hd-1 asks hd-2 for _ping. hd-2's server is published behind "
          "public-proxy-1.ga,\nso hd-1 asks the proxy for a connection, both dial its internal "
          "endpoint with a token,\nand they speak mutual TLS through the splice:")
    wait_for(
        "hd-1 and hd-2 linking to public-proxy-1.ga",
        lambda: (metric(PROXY_EPS_METRICS, "eps_peer_links", 'direction="incoming"') or 0) >= 2,
    )
    before = metric(PROXY_METRICS, PAIRINGS) or 0.0
    reply = call(5555, "hd-1", "hd-2._ping", {}, timeout=20)
    if "error" in reply:
        raise DemoError(f"hd-2._ping failed: {reply['error']}")
    after = metric(PROXY_METRICS, PAIRINGS) or 0.0
    result = reply["result"]
    print(f"  hd-2._ping -> serverInfo.name = {result['serverInfo']['name']!r}, "
          f"version {result['version']}, timestamp {result['timestamp']},\n"
          f"     caller as hd-2 saw it: {result['params']['_client']['name']!r}")
    print(f"  the proxy's pairings went from {before:.0f} to {after:.0f} "
          f"(http://localhost:{PROXY_METRICS}/metrics)")
    print(
        "\nAsk it yourself:\n  curl --cert conf/dev/certs/hd-1.crt --key conf/dev/certs/hd-1.key "
        "--cacert conf/dev/certs/root.crt --resolve hd-1:5555:127.0.0.1 "
        "https://hd-1:5555/jsonrpc -H 'Content-Type: application/json' "
        "--data '{\"method\": \"hd-2._ping\", \"id\": \"1\", \"params\": {}, \"jsonrpc\": \"2.0\"}'"
    )


SNI_DOMAIN = "test.internal-server.local"
SNI_PORT = 4433


def https_get(host: str, port: int, path: str, timeout: float = 15) -> tuple[int, bytes]:
    """GET ``https://host:port/path`` at 127.0.0.1, verifying ``host`` against the dev root."""
    context = ssl.create_default_context(cafile=str(CERTS / "root.crt"))
    connection = _ResolvedHTTPS(host, port, context=context, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def metric_value(url: str, name: str, labels: Mapping[str, str]) -> float | None:
    """The value of the sample ``name{labels}`` at the metrics page ``url``, or None."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def wait_for_metric(url: str, name: str, labels: Mapping[str, str], seconds: float) -> float:
    """Wait up to ``seconds`` for ``name{labels}`` to be positive; its last value (0 if none)."""
    deadline = time.monotonic() + seconds
    while True:
        value = metric_value(url, name, labels) or 0.0
        if value > 0 or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def sni_passthrough() -> None:
    """SPEC §21.6: an ordinary TLS client reaches an internal server through both proxies."""
    print(f"\nTLS passthrough: hd-1's application announces {SNI_DOMAIN} at the private proxy,\n"
          "which claims it at the public proxy; a plain HTTPS client then reaches the internal\n"
          f"server through the public proxy's port {SNI_PORT} (TLS is terminated behind the "
          "private proxy):")
    reply = call(5555, "hd-1", "private-proxy-1.ga.announceConnection",
                 {"proxy": "public-proxy-1.ga", "domain": SNI_DOMAIN}, timeout=20)
    if "error" in reply:
        raise DemoError(f"announceConnection failed: {reply['error']}")
    print(f"  private-proxy-1.ga.announceConnection -> {json.dumps(reply.get('result'))}")
    # The private proxy keeps idle connections open at the public proxy (issue 14), so a
    # client is served without a brokering round trip once the pool has filled.
    pages = dict(page_urls())
    public_metrics = pages["public-proxy-1"] + "metrics"
    private_metrics = pages["private-proxy-1"] + "metrics"
    pooled = wait_for_metric(public_metrics, "proxy_pool_connections",
                             {"operator": "private-proxy-1.ga", "state": "idle"}, seconds=15)
    if not pooled:
        raise DemoError("the private proxy's connection pool did not fill within 15 s "
                        "(see run/private-proxy-1.log and run/public-proxy-1.log)")
    print(f"  private-proxy-1.ga keeps {pooled:.0f} idle pooled connection(s) at the public proxy")
    before = metric_value(public_metrics, "proxy_pool_requests_total", {"outcome": "hit"}) or 0
    status, body = https_get(SNI_DOMAIN, SNI_PORT, "/jsonrpc")
    print(f"  GET https://{SNI_DOMAIN}:{SNI_PORT}/jsonrpc -> {status} {body.decode(errors='replace')}")
    if status != 200:
        raise DemoError("the internal server did not answer through the proxies")
    hits = (metric_value(public_metrics, "proxy_pool_requests_total", {"outcome": "hit"}) or 0)
    calls = metric_value(private_metrics, "private_proxy_incoming_calls_total", {}) or 0
    print(f"  served from the pool: {hits - before:.0f} pooled connection(s) used, "
          f"{calls:.0f} incomingConnection call(s) so far (the brokered fallback)")
    if hits - before < 1:
        raise DemoError("the client was not served from the connection pool")
    print(
        "\nAsk it yourself:\n  curl --cacert conf/dev/certs/root.crt "
        f"--resolve {SNI_DOMAIN}:{SNI_PORT}:127.0.0.1 https://{SNI_DOMAIN}:{SNI_PORT}/jsonrpc"
    )


def page_urls() -> list[tuple[str, str]]:
    """(role, URL) of each role's status page: ``/`` of the metrics listener its settings name."""
    urls = []
    for role in ROLES:
        if not role.plugin:
            continue
        try:
            settings = yaml.safe_load((role.settings / f"{role.plugin}.yml").read_text())
            address = settings["metrics"]["bind_address"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
        urls.append((role.name, f"http://{address}/"))
    return urls


def status_pages() -> None:
    """Where to look: each role's read-only status page (the SD's is its directory browser)."""
    print("\nStatus pages (read-only; /metrics beside each for Prometheus):")
    for name, url in page_urls():
        what = "directory browser" if name.startswith("sd-") else "status page"
        print(f"  {name:<20} {what:<18} {url}")


def start(run_dir: Path, overlays: Mapping[str, Path] | None = None) -> None:
    """Start the dev network (``overlays``: extra settings folders by role, see _start_role)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stop(run_dir)
    for role in SD_ROLES:
        _wait_ready(run_dir, role, _start_role(run_dir, role, overlays))
    if call(3322, "sd-1", "getTip", {}).get("result") is None:
        # An empty SD starts a new history: the endpoint servers' cached checkpoints of an
        # older one (its store deleted) would make them refuse it, rightly.
        for role in EPS_ROLES:
            (ROOT / "run" / role.name / "directory-cache.json").unlink(missing_ok=True)
    sd_setup()
    show_directory()
    print()
    for role in EPS_ROLES:
        _wait_ready(run_dir, role, _start_role(run_dir, role, overlays))
    getting_started()
    peer_to_peer()
    sni_passthrough()
    status_pages()
    print(f"\nLogs and pids are in {run_dir}/; `make stop` stops the network.")



# -- helpers for harnesses that run the dev network (make chaos, make soak) ----------


def port_accepts(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def check_ports_free() -> None:
    """Refuse to start a second dev network: every role's port must be free."""
    ports = [(r.name, r.port) for r in ROLES] + [("public proxy TLS", SNI_PORT)]
    busy = [f"{name} ({port})" for name, port in ports if port_accepts(port)]
    if busy:
        raise DemoError(f"ports in use: {', '.join(busy)}; is `make demo` running? "
                        "(`make stop`)")


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (and its children's) to ``path`` for a while."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def machine() -> str:
    """One line naming this machine, for reports: OS, CPUs, memory, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}){memory}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epsproxy.dev.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "sd-setup"))
    parser.add_argument("--run-dir", default="run", help="folder for logs, pids and data")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    try:
        if args.command == "start":
            start(run_dir)
        elif args.command == "stop":
            stop(run_dir)
        else:
            sd_setup()
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


#: Each proxy's gauge of the pooled connections it holds, and the states that hold a
#: descriptor while no client uses them (issue 14's pool).
POOL_GAUGES = {
    "public-proxy-1": ("proxy_pool_connections", ("idle",)),
    "private-proxy-1": ("private_proxy_pool_connections", ("idle", "connecting")),
}


def pooled_connections() -> dict[str, int]:
    """Idle pooled connections each proxy holds now, from its metrics page (0 if not read)."""
    pages = dict(page_urls())
    counts = {}
    for name, (gauge, states) in POOL_GAUGES.items():
        page = pages.get(name)
        counts[name] = 0 if page is None else int(sum(
            metric_value(page + "metrics", gauge, {"state": state}) or 0
            for state in states))
    return counts


if __name__ == "__main__":
    sys.exit(main())
