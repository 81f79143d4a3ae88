"""
``python -m chaos [--run-dir DIR] [--seconds N]`` (``make chaos``): start the dev network,
run steady checked traffic through it, kill -9 and restart its parts one at a time, drain
the proxies with SIGTERM, and print what each fault cost.

Streams (each answer checked):

- ``p2p``  20/s ``hd-2._ping`` at hd-1's gateway (through the public proxy's splice);
  the answer must name hd-2 and echo the call's sequence number;
- ``ls``   20/s ``ls-1.lookup`` of a name added earlier; the id must match;
- ``add``   2/s ``ls-1.add`` of a fresh name (every acknowledged add is looked up at the end);
- ``sni``  10/s HTTPS GET of ``test.internal-server.local`` on the public proxy's port
  4433, a fresh TLS connection each (public proxy → private proxy → internal server);
- ``dir``   5/s ``hd-1._directory`` for hd-2 (served from hd-1's verified directory).

With ``--store redis`` (``make chaos-redis``) a real ``redis-server`` (append-only file,
fsync on every write, data under the run dir) is the datastore of the SD, the public and
the private proxy (settings overlays written to ``DIR/settings/``, conf/dev untouched), the
faults include kill -9 of Redis, and two streams write to the stores:

- ``rec``  0.5/s a change record signed by hd-1, submitted to sd-1 (every acknowledged
  one must be in the SD's chain and in Redis at the end);
- ``ann``   1/s ``private-proxy-1.ga.announceConnection`` of one domain with a later
  expiry each time (written to the private and then the public proxy's store).

With ``--store redis-sentinel`` the same, but that ``redis-server`` is the master of a
replica and three ``redis-sentinel`` (quorum 2), the roles' settings name the sentinels,
and the Redis fault is the master's death: a failover, with the old master restarted (its
data kept) and turned into a replica by the sentinels (issue 15).

The last fault of every run (``--only fork``) is an SD that serves a forked history to
hd-2 (:mod:`chaos.fork`): hd-2's own refusal, the gossip alarm on hd-1 and hd-2, the
evidence, and what getting every node ready again takes.

The network's logs and pid files are in ``--run-dir`` (default ``run/chaos``); the roles'
own data (SD records, directory caches, announcement stores) are where their settings put
them (``run/<role>/``).  Exit status 0 only if every fault recovered and nothing
acknowledged was lost.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from epsproxy.dev import demo
from epsproxy.store import parse

from .faults import (
    Fault,
    FaultResult,
    LongConnection,
    Network,
    private_announcements,
    public_announcements,
    run_fault,
    public_announcements_full,
    sd_tip,
    submit_probe,
    wait_until,
)
from .fork import ForkedHistory, ForkedSD, forget_directory_caches
from .store import (
    STORE_ROLES,
    RecordWriter,
    RedisClient,
    RedisError,
    RedisProcess,
    SentinelGroup,
    write_overlays,
)
from .traffic import CallFailed, GatewayClient, Outcome, Stream, Traffic, client_context, https_get

STREAMS = ("p2p", "ls", "add", "sni", "dir", "rec", "ann")
#: The domain the ``ann`` stream announces again and again (later expiry each time).
ANN_DOMAIN = "chaos-ann.internal-server.local"


class Workload:
    """The streams and the state their checks need (acknowledged adds)."""

    def __init__(self, store: str = "embedded") -> None:
        self.gateway = GatewayClient(5555, "hd-1", client_context(demo.CERTS, "hd-1"), timeout=5)
        self.plain = client_context(demo.CERTS, None)
        self.acked: dict[str, str] = {"Berlin": "loc-berlin-1"}  # added by make demo's flow
        self._lock = threading.Lock()
        self.run_tag = f"{int(time.time())}"
        #: Signs and submits SD records (``--store redis``: the ``rec`` stream and probes).
        self.writer = RecordWriter() if store != "embedded" else None
        self._expiry_base = int(time.time()) + 86400
        #: The latest ``expires_at`` of an acknowledged ``ann`` call.
        self.ann_acked: str | None = None

    def streams(self) -> list[Stream]:
        streams = [
            Stream("p2p", 20, self.ping),
            Stream("ls", 20, self.lookup),
            Stream("add", 2, self.add),
            Stream("sni", 10, self.sni),
            Stream("dir", 5, self.directory),
        ]
        if self.writer is not None:
            # One worker each: records chain on the tip, and announcements of one domain
            # must reach the public proxy in order.
            streams += [Stream("rec", 0.5, self.record, workers=1),
                        Stream("ann", 1, self.announce, workers=1)]
        return streams

    def record(self, n: int) -> None:
        assert self.writer is not None
        self.writer.submit(f"chaos-{self.run_tag}-rec-{n}", name="chaos-rec")

    def expiry(self, n: int) -> str:
        stamp = time.gmtime(self._expiry_base + n)
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", stamp)

    def announce(self, n: int) -> None:
        expires = self.expiry(n)
        result = self.announce_domain(ANN_DOMAIN, expires)
        if result != "ok":
            raise CallFailed(f"announceConnection: {result!r}")
        with self._lock:
            self.ann_acked = max(self.ann_acked or "", expires)

    def announce_domain(self, domain: str, expires: str | None = None) -> Any:
        params = {"proxy": "public-proxy-1.ga", "domain": domain}
        if expires:
            params["expires_at"] = expires
        return self.gateway.call("private-proxy-1.ga.announceConnection", params)

    def submit(self, tag: str) -> None:
        """A probe record: in this process with ``--store redis``, else with ``eps sd``."""
        if self.writer is not None:
            self.writer.submit(tag)
        else:
            submit_probe(tag)

    def ping(self, n: int) -> None:
        result = self.gateway.call("hd-2._ping", {"n": n})
        if result["serverInfo"]["name"] != "hd-2" or result["params"].get("n") != n:
            raise CallFailed(f"wrong answer: {json.dumps(result)[:120]}")

    def lookup(self, n: int) -> None:
        with self._lock:
            name, expected = random.choice(list(self.acked.items()))
        result = self.gateway.call("ls-1.lookup", {"name": name})
        if result != expected:
            raise CallFailed(f"lookup {name}: {result!r}, expected {expected!r}")

    def add(self, n: int) -> None:
        name, value = f"chaos-{self.run_tag}-{n}", f"id-{n}"
        result = self.gateway.call("ls-1.add", {"name": name, "id": value})
        if result != "ok":
            raise CallFailed(f"add: {result!r}")
        with self._lock:
            self.acked[name] = value

    def sni(self, n: int) -> None:
        status, body = https_get(demo.SNI_DOMAIN, demo.SNI_PORT, f"/chaos/{n}", self.plain)
        if status != 200 or json.loads(body) != {"message": "success"}:
            raise CallFailed(f"GET: {status} {body[:80]!r}")

    def directory(self, n: int) -> None:
        entries = self.gateway.call("hd-1._directory", {"operator": "hd-2"})["entries"]
        if [e["name"] for e in entries] != ["hd-2"]:
            raise CallFailed(f"_directory: {[e.get('name') for e in entries]}")

    def lost_adds(self) -> tuple[int, int, list[str]]:
        """Look every acknowledged add up again: (lost, checked, examples)."""
        client = GatewayClient(5555, "hd-1", client_context(demo.CERTS, "hd-1"), timeout=10)
        lost = []
        with self._lock:
            items = list(self.acked.items())
        for name, value in items:
            try:
                if client.call("ls-1.lookup", {"name": name}) != value:
                    lost.append(name)
            except Exception as e:
                lost.append(f"{name} ({e})")
        return len(lost), len(items), lost[:5]


def _faults(network: Network, workload: Workload, fork: ForkedSD,
            traffic: Traffic) -> list[Fault]:
    state: dict[str, Any] = {}

    def sd_before(r: FaultResult) -> None:
        state["tip"] = sd_tip()

    def sd_during(r: FaultResult) -> None:
        entries = workload.gateway.call("hd-1._directory", {})["entries"]
        r.notes.append(f"SD down: hd-1 still lists {len(entries)} operators")

    def tip_kept() -> str:
        """Whether the SD still has the tip it had before the fault."""
        tip = sd_tip()
        if tip == state["tip"]:
            return "none (tip kept)"
        if workload.writer is not None:  # the rec stream moves the tip on
            chain = workload.writer.chain()
            if state["tip"] in chain:
                added = len(chain) - 1 - chain.index(state["tip"])
                return f"none (tip kept, {added} records acked since)"
        return "TIP CHANGED"

    def sd_after(r: FaultResult) -> None:
        r.lost = tip_kept()
        tag = f"chaos-{time.time_ns()}"
        t0 = time.monotonic()
        workload.submit(tag)
        acked = time.monotonic() - t0
        seen = seen_at_hd1(tag)
        if seen is None:
            r.recovered = False
            r.notes.append("record submitted after restart NOT seen at hd-1 within 30 s")
        else:
            r.notes.append(f"record submitted after restart (acked in {acked:.1f} s) "
                           f"seen at hd-1 {seen:.1f} s later")

    def sd_down_eps_restart(r: FaultResult) -> None:
        network.signal("hd-2", signal.SIGKILL)
        network.wait_exit("hd-2", 10)
        try:
            took = network.restart("hd-2")
        except demo.DemoError as e:
            r.recovered = False
            r.notes.append(f"hd-2 restarted while the SD is down did not come up: {str(e)[:200]}")
            return
        served = wait_until(lambda: workload.gateway.call("hd-2._ping", {})["serverInfo"]
                            ["name"] == "hd-2", 20)
        if served is None:
            r.recovered = False
            r.notes.append(f"hd-2 restarted while the SD is down (up in {took:.1f} s) "
                           "NOT reachable within 20 s")
        else:
            r.notes.append(f"hd-2 restarted while the SD is down: up in {took:.1f} s, "
                           f"hd-1 reaches it {served:.1f} s later (from its cache)")

    def public_before(r: FaultResult) -> None:
        state["public"] = public_announcements()

    def public_after(r: FaultResult) -> None:
        now = public_announcements()
        missing = sorted(set(state["public"]) - set(now))
        r.lost = f"none ({len(now)} announcements back from the store)" if not missing \
            else f"announcements lost: {missing}"

    def links_after(r: FaultResult) -> None:
        took = wait_until(lambda: (demo.metric(demo.PROXY_EPS_METRICS, "eps_peer_links",
                                               'direction="incoming"') or 0) >= 2, 60)
        r.notes.append("hd-1/hd-2 links to it back after "
                       + (f"{took:.1f} s" if took is not None else "MORE THAN 60 s"))
        if took is None:
            r.recovered = False
        r.lost = "n/a (no state)"

    def hd2_after(r: FaultResult) -> None:
        r.lost = "n/a (no state)"

    def private_before(r: FaultResult) -> None:
        state["private"] = private_announcements()
        state["public"] = public_announcements()

    def private_after(r: FaultResult) -> None:
        now = private_announcements()
        missing = sorted(set(state["private"]) - set(now))
        r.lost = f"none ({len(now)} announcements back from the store)" if not missing \
            else f"announcements lost: {missing}"
        took = wait_until(lambda: set(state["public"]) <= set(public_announcements()), 10)
        r.notes.append("public proxy still lists its domains" if took is not None
                       else "public proxy lost its domains")

    def drain_before(r: FaultResult) -> None:
        long = LongConnection(demo.SNI_DOMAIN, demo.SNI_PORT, workload.plain)
        long.start()
        if wait_until(lambda: long.requests >= 3, 10) is None:
            r.notes.append(f"long connection did not start: {long.how}")
        state["long"] = long

    def drain_during(r: FaultResult) -> None:
        long: LongConnection = state["long"]
        wait_until(lambda: long.ended_at is not None, 2)
        long.stop()
        if long.ended_at is not None:
            lived = long.ended_at - r.t_signal
            r.notes.append(
                f"long spliced connection ({long.requests} GETs) ended "
                f"{lived:.2f} s after SIGTERM ({long.how}); "
                + ("no grace period" if lived < 1 else "kept for the grace period"))
        else:
            r.notes.append("long spliced connection survived the exit (?)")

    def drain_after(r: FaultResult) -> None:
        r.lost = "-"

    redis: RedisProcess | None = network.extra.get("redis")
    sentinels: SentinelGroup | None = network.extra.get("sentinels")

    def redis_client() -> RedisClient:
        """The Redis that is the master now (with sentinels: whichever they name)."""
        assert redis is not None
        return RedisClient(sentinels.master_port() if sentinels else redis.port)

    def seen_at_hd1(tag: str) -> float | None:
        return wait_until(lambda: any(
            tag in e["groups"]
            for e in workload.gateway.call("hd-1._directory", {"operator": "chaos-probe"})["entries"]
        ), 30)

    def redis_before(r: FaultResult) -> None:
        assert redis is not None
        state["tip"] = sd_tip()
        state["public"] = public_announcements()
        state["private"] = private_announcements()
        client = redis_client()
        state["master"] = client.port
        state["lists"] = {}
        for role, (_, key) in STORE_ROLES.items():
            length = client.command("LLEN", key)
            state["lists"][key] = (length, client.digest(key, length))

    def redis_during(r: FaultResult) -> None:
        """While Redis is down: a record and an announcement must get a clear, quick error."""
        for what, attempt in (
            ("record submitted", lambda: workload.submit(f"chaos-{time.time_ns()}-down")),
            ("announcement made", lambda: workload.announce_domain(
                f"chaos-down-{time.time_ns()}.internal-server.local")),
        ):
            t0 = time.monotonic()
            try:
                attempt()
            except Exception as e:
                took = time.monotonic() - t0
                text = str(e) if isinstance(e, CallFailed) else f"{type(e).__name__}: {e}"
                hang = " (TIMED OUT: a hang, not a clear error)" if isinstance(e, TimeoutError) \
                    else ""
                if hang:
                    r.recovered = False
                r.notes.append(f"{what} during the outage: refused in {took:.2f} s "
                               f"({text[:140]}){hang}")
            else:
                r.recovered = False
                r.notes.append(f"{what} during the outage was ACCEPTED (where did it go?)")

    def redis_after(r: FaultResult) -> None:
        assert redis is not None
        problems = []
        # The first write accepted after the restart (the store's own recovery).
        tag = f"chaos-{time.time_ns()}-after"
        def accepted() -> bool:
            workload.submit(tag)
            return True

        took = wait_until(accepted, 30)
        if took is None:
            r.recovered = False
            r.notes.append("no record accepted within 30 s of the restart")
        else:
            seen = seen_at_hd1(tag)
            r.notes.append(f"record accepted {took:.1f} s after the restart, "
                           + (f"seen at hd-1 {seen:.1f} s later" if seen is not None
                              else "NOT seen at hd-1 within 30 s"))
            if seen is None:
                r.recovered = False
        # What Redis held before the kill is still there, byte for byte (with sentinels:
        # on the replica that took over).
        client = redis_client()
        if sentinels is not None:
            r.notes.append(f"the sentinels moved the master from port {state['master']} to "
                           f"{client.port}" if client.port != state["master"]
                           else "NO FAILOVER: the sentinels still name the restarted master")
            if client.port == state["master"]:
                r.recovered = False
        for key, (length, digest) in state["lists"].items():
            now = client.command("LLEN", key)
            if now < length or client.digest(key, length) != digest:
                problems.append(f"{key}: {length} entries before, {now} after, "
                                "first ones " + ("same" if client.digest(key, length) == digest
                                                 else "DIFFERENT"))
        # Every record the SD acknowledged is in Redis (not only in the SD's memory).
        assert workload.writer is not None
        in_redis = set()
        for item in client.command("LRANGE", STORE_ROLES["sd-1"][1], 0, -1):
            in_redis.add(json.loads(parse(item).data)["hash"])
        missing = [h for h in workload.writer.acked if h not in in_redis]
        if missing:
            problems.append(f"{len(missing)} acknowledged records not in Redis")
        # The SD's chain still has its old tip; the proxies still list their domains.
        tip = tip_kept()
        if not tip.startswith("none"):
            problems.append(tip)
        for name, listed, before in (("public", public_announcements(), state["public"]),
                                     ("private", private_announcements(), state["private"])):
            gone = sorted(set(before) - set(listed))
            if gone:
                problems.append(f"{name} proxy lost announcements {gone}")
        stored = {json.loads(parse(item).data)["domain"]
                  for item in client.command("LRANGE", STORE_ROLES["public-proxy-1"][1], 0, -1)}
        if not set(state["public"]) <= stored:
            problems.append(f"public announcements not in Redis: "
                            f"{sorted(set(state['public']) - stored)}")
        # A new announcement works and reaches the public proxy.
        domain = f"chaos-after-{time.time_ns()}.internal-server.local"
        try:
            workload.announce_domain(domain)
            shown = wait_until(lambda: domain in public_announcements(), 10)
            r.notes.append("new announcement after recovery "
                           + (f"listed by the public proxy {shown:.1f} s later"
                              if shown is not None else "NOT listed by the public proxy"))
            if shown is None:
                r.recovered = False
        except Exception as e:
            r.recovered = False
            r.notes.append(f"new announcement after recovery FAILED: {e}"[:200])
        counts = ", ".join(f"{key.split(':')[1]} {length}"
                           for key, (length, _) in state["lists"].items())
        r.lost = (f"none (entries before the kill intact: {counts}; "
                  f"{len(workload.writer.acked)} acked records in Redis)"
                  if not problems else "LOST/CORRUPT: " + "; ".join(problems))

    redis_name = ("redis master under Sentinel (store of SD and proxies)" if sentinels
                  else "redis (store of SD and proxies)")
    redis_faults = [
        Fault(redis_name, ("redis",), before=redis_before, during=redis_during,
              after=redis_after),
    ] if redis is not None else []

    return redis_faults + [
        Fault("service directory", ("sd-1",), before=sd_before, during=sd_during, after=sd_after),
        Fault("SD down, hd-2 restarted", ("sd-1",), before=sd_before,
              during=sd_down_eps_restart, after=sd_after),
        Fault("public proxy", ("public-proxy-1",), before=public_before, after=public_after),
        Fault("public proxy's EPS", ("public-proxy-eps-1",), after=links_after),
        Fault("peer EPS hd-2", ("hd-2",), after=hd2_after),
        Fault("private proxy", ("private-proxy-1",), before=private_before, after=private_after),
        Fault("drain public proxy", ("public-proxy-1",), signal=signal.SIGTERM,
              before=drain_before, during=drain_during, after=drain_after),
        Fault("drain private proxy", ("private-proxy-1",), signal=signal.SIGTERM,
              before=drain_before, during=drain_during, after=drain_after),
        ForkedHistory(network, fork, workload.submit,
                      lambda since, until: traffic.window(since, until)).fault(),
    ]


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def _failed(result: FaultResult) -> str:
    parts = [f"{s} {result.failed[s]}/{result.calls[s]}" for s in STREAMS if result.failed[s]]
    return ", ".join(parts) or f"0/{sum(result.calls.values())}"


def _recover(result: FaultResult) -> str:
    parts = [f"{s} {_seconds(result.recover.get(s))}" for s in STREAMS if result.failed[s]]
    return ", ".join(parts) or "-"


def table(results: list[FaultResult]) -> str:
    """The markdown table of the faults."""
    lines = [
        "| fault | signal | down s | exit s | ready s | failed/calls during fault | "
        "recover s (first ok after restart) | last failure after restart s | lost | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        last = ", ".join(f"{s} {r.last_failure[s]:.1f}" for s in STREAMS if s in r.last_failure)
        notes = "; ".join(n for n in r.notes if n)
        if not r.recovered:
            notes = "**NOT RECOVERED** " + notes
        lines.append(
            f"| {r.name} | {r.signal} | {r.down:.1f} | {_seconds(r.exit_seconds)} | "
            f"{r.ready:.1f} | {_failed(r)} | {_recover(r)} | {last or '-'} | {r.lost} | {notes} |"
        )
    return "\n".join(lines)


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def steady(outcomes: list[Outcome]) -> str:
    """Calls, failures and latency per stream while nothing was broken."""
    lines = ["| stream | calls | failed | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for stream in STREAMS:
        mine = [o for o in outcomes if o.stream == stream]
        if not mine:
            continue
        took = [(o.end - o.start) * 1000 for o in mine if o.ok]
        lines.append(f"| {stream} | {len(mine)} | {sum(not o.ok for o in mine)} | "
                     f"{_percentile(took, 0.5):.0f} | {_percentile(took, 0.99):.0f} |")
    return "\n".join(lines)


def _errors(results: list[FaultResult]) -> str:
    lines = []
    for r in results:
        for text, count in r.errors.most_common(4):
            lines.append(f"- {r.name}: {count} × {text}")
    return "\n".join(lines) or "- none"


def run(run_dir: Path, down: float, baseline: float, only: list[str] | None,
        store: str = "embedded") -> int:
    started = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    demo.stop(run_dir)
    redis = RedisProcess(run_dir)
    redis.clean()
    group = SentinelGroup(run_dir, redis)
    group.clean()
    demo.check_ports_free()
    overlays: dict[str, Path] = {}
    extra: dict[str, Any] = {}
    store_line = "Store: embedded SQLite for every role (conf/dev)."
    if store in ("redis", "redis-sentinel"):
        if store == "redis-sentinel":
            redis.extra_args = SentinelGroup.QUICK_SYNC
        redis.start()
        sentinel_line = ""
        if store == "redis-sentinel":
            took = group.start()
            extra["sentinels"] = group
            sentinel_line = (f", the master of the replica {group.replica.address}, watched "
                             f"by redis-sentinel {', '.join(group.addresses)} (quorum 2, down "
                             f"after 1 s; ready in {took:.1f} s),")
        overlays = write_overlays(run_dir, redis.address,
                                  group.addresses if store == "redis-sentinel" else None)
        extra["redis"] = redis
        store_line = (f"Store: redis-server {redis.address} (`--appendonly yes --appendfsync "
                      f"always`, data in {redis.data}){sentinel_line} for "
                      + ", ".join(f"{role} (key `{key}`)" for role, (_, key) in STORE_ROLES.items())
                      + f"; settings overlays in {run_dir / 'settings'}.")
        print(store_line, flush=True)
    forgotten = forget_directory_caches()
    if forgotten:
        print(f"deleted the directory caches of {', '.join(forgotten)} (the SD of this run "
              "may hold another history than the one they verified)", flush=True)
    print(f"starting the dev network in {run_dir} (output in {run_dir / 'start.out'})",
          flush=True)
    try:
        with demo.output_to(run_dir / "start.out"):
            demo.start(run_dir, overlays)
    except demo.DemoError:
        print((run_dir / "start.out").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    print(f"network up in {time.monotonic() - started:.0f} s", flush=True)
    network = Network(run_dir, overlays, extra)
    fork = ForkedSD(run_dir)
    workload = Workload(store)
    traffic = Traffic(workload.streams())
    traffic.start()
    t_traffic = time.monotonic()
    results: list[FaultResult] = []
    try:
        time.sleep(baseline)
        for fault in _faults(network, workload, fork, traffic):
            if only and not any(word in fault.name for word in only):
                continue
            results.append(run_fault(network, traffic, fault, baseline=baseline, down=down))
            print(table(results[-1:]).splitlines()[-1], flush=True)
        t_first = min((r.t_signal for r in results), default=time.monotonic())
    finally:
        traffic.stop()
        fork.stop()
    lost, checked, examples = workload.lost_adds()
    written = []
    if workload.writer is not None:
        records_lost, records, record_examples = workload.writer.lost()
        lost += records_lost
        written.append(f"Acknowledged `rec` records in the SD's chain at the end: {records}, "
                       f"lost {records_lost}"
                       + (f" (e.g. {', '.join(record_examples)})" if record_examples else "")
                       + ".")
        ann = [a for a in public_announcements_full() if a["domain"] == ANN_DOMAIN]
        expires = ann[0].get("expires_at") if ann else None
        ann_lost = workload.ann_acked is not None and (expires or "") < workload.ann_acked
        lost += int(ann_lost)
        written.append(f"`ann`: the last acknowledged expiry {workload.ann_acked}, "
                       f"the public proxy lists {expires}"
                       + (" — LOST" if ann_lost else " (nothing lost)") + ".")
    command = f"python -m chaos --seconds {down:g}"
    if store != "embedded":
        command += f" --store {store}"
    command += "".join(f" --only '{word}'" for word in only or [])
    report = "\n\n".join([
        f"Command: `{command}`; machine: {demo.machine()}; "
        f"whole run {time.monotonic() - started:.0f} s.",
        store_line,
        "Steady traffic before the first fault:\n\n"
        + steady(traffic.window(t_traffic, t_first)),
        "Faults (one at a time, traffic running; a call counts for a fault if it started "
        "between the signal and the end of the fault):\n\n" + table(results),
        f"Acknowledged `ls-1.add` calls looked up again at the end: {checked}, lost {lost}"
        + (f" (e.g. {', '.join(examples)})" if examples else "") + ".",
        *written,
        "Ticks skipped because every worker of a stream was busy (calls hanging): "
        + ", ".join(f"{s.name} {s.skipped}" for s in traffic.streams) + ".",
        "Most frequent errors per fault:\n\n" + _errors(results),
    ])
    print("\n" + report)
    (run_dir / "chaos-report.md").write_text(report + "\n")
    ok = lost == 0 and all(r.recovered for r in results) and all(
        r.lost.startswith(("none", "n/a", "-")) for r in results)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="run/chaos", help="folder for logs and pids")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long each killed part stays down (default 5)")
    parser.add_argument("--baseline", type=float, default=4.0,
                        help="seconds of steady traffic before each fault (default 4)")
    parser.add_argument("--only", action="append",
                        help="run only faults whose name contains this (repeatable)")
    parser.add_argument("--store", choices=("embedded", "redis", "redis-sentinel"),
                        default="embedded",
                        help="datastore of sd-1, public-proxy-1 and private-proxy-1: the "
                             "dev roles' embedded SQLite (default), a redis-server started "
                             "for the run (adds the fault 'redis'), or that server as the "
                             "master of a replica under three sentinels (adds the fault "
                             "'redis master under Sentinel')")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    try:
        return run(run_dir, args.seconds, args.baseline, args.only, args.store)
    except (demo.DemoError, RedisError) as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        ForkedSD(run_dir).stop()
        demo.stop(run_dir)
        redis = RedisProcess(run_dir)
        SentinelGroup(run_dir, redis).stop()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
