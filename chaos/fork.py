"""
The forked-history fault of the chaos run (issue 15 item 6): an SD that serves a forked
history to one endpoint server.

:class:`ForkedSD` is a second SD process started for the run: sd-1's own settings (its
TLS certificate and its checkpoint signing key, so it is indistinguishable from sd-1 by
anything but the history it serves), its own embedded store in the run dir and free
loopback ports.  Its store is filled by replaying a prefix of sd-1's chain (the same
signed records) and then a different record signed by the sd-admin hd-1: the same
history up to some point, then a fork.

:class:`ForkedHistory` is the fault, in two phases with hd-2 pointed at the forked SD
(``directory.settings.endpoints`` needs a restart, so hd-2 is killed and restarted with a
settings overlay, as other faults restart roles):

1. *Direct refusal*: sd-1 gets a record A at position N+1 and hd-2 verifies it; the
   forked SD holds B at N+1.  hd-2, restarted onto the forked SD, sees a different record
   at a position it verified and must refuse the view (``reason="fork"``), keep serving
   from its verified cache and report ``checkpoint: degraded``.
2. *Gossip*: the forked SD now serves hd-2's verified chain plus a record B' while sd-1
   gets A' at the same position.  hd-2 accepts (the view extends what it verified); only
   gossip can catch it: hd-1 and hd-2 must both raise the split-view alarm and save
   evidence that ``eps sd verify-evidence`` accepts.

Recovery: hd-2 switched back to sd-1, then what an operator must do to get every
endpoint server ready again (measured, not assumed).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from epsproxy.dev import demo

from .faults import Fault, FaultResult, Network, wait_until
from .store import RecordWriter, free_port
from .traffic import GatewayClient, Outcome, client_context

__all__ = ["ForkedHistory", "ForkedSD", "FORK_FAULT", "forget_directory_caches", "readiness"]

#: The fault's name (``--only fork``).
FORK_FAULT = "forked SD for hd-2"
#: The endpoint server that is shown the fork, and the one it gossips with.
VICTIM, WITNESS = "hd-2", "hd-1"
#: Metrics (and /readyz) ports of the dev endpoint servers (conf/dev/roles/*/eps.yml).
METRICS = {"hd-1": 2112, "hd-2": 2113, "public-proxy-eps-1": 2115,
           "private-proxy-eps-1": 2116, "ls-1": 2117}
#: hd-2's gossip interval while it is on the forked SD (the default is 60 s; a round
#: only starts one interval after the start, so detection with the default takes up to
#: one interval more than measured here).
GOSSIP_INTERVAL = 1.0
#: Records of the fork in phase 1 (after the common prefix).
PHASE1_LENGTH = 20
#: The reasons of ``eps_directory_views_refused_total`` (docs/checkpoints.md).
REFUSALS = ("fork", "rollback", "reset", "mismatch", "unsigned", "bad_checkpoint",
            "witnesses", "origin")


@dataclass(frozen=True)
class _FolderRole(demo.Role):
    """A dev role whose settings folder is not named after it (sd-fork uses sd-1's)."""

    folder: Path = demo.CONF / "roles" / "sd-1"

    @property
    def settings(self) -> Path:
        return self.folder


def role_data(role: str) -> Path:
    """The folder of a dev role's own data (its settings put it in ``run/<role>/``)."""
    return demo.ROOT / "run" / role


def forget_directory_caches() -> list[str]:
    """
    Delete the endpoint servers' directory caches (``run/<role>/directory-cache.json``)
    before a run: each holds the last checkpoint its server verified, and the SD a run
    starts may hold another history (``--store redis`` starts from an empty Redis, a run
    on SQLite after a Redis run finds the SQLite chain).  The dev network loads its
    directory with a reset that names only the SD's own last checkpoint, so a cache of
    another history would make that server refuse the directory for the whole run (an
    unsigned reset, as it must).  Returns the roles whose cache was deleted.
    """
    gone = []
    for role in METRICS:
        cache = role_data(role) / "directory-cache.json"
        if cache.exists():
            cache.unlink()
            gone.append(role)
    return gone


def readiness(role: str) -> tuple[int, dict[str, str]]:
    """``/readyz`` of an endpoint server: (HTTP status, the checks not ready)."""
    connection = http.client.HTTPConnection("127.0.0.1", METRICS[role], timeout=5)
    try:
        connection.request("GET", "/readyz")
        response = connection.getresponse()
        body = json.loads(response.read() or b"{}")
        return response.status, dict(body.get("checks") or {})
    finally:
        connection.close()


def _ready(role: str) -> bool:
    return readiness(role)[0] == 200


def metric(role: str, name: str, labels: str = "") -> float:
    """One sample of an endpoint server's metrics (0 when absent)."""
    return demo.metric(METRICS[role], name, labels) or 0.0


def cached_chain(role: str) -> list[dict[str, Any]]:
    """The records of the chain an endpoint server verified (its directory cache file)."""
    data = json.loads((role_data(role) / "directory-cache.json").read_text())
    return list(data["records"])


def evidence_files(role: str) -> set[Path]:
    folder = role_data(role) / "evidence"
    return set(folder.glob("evidence-*.json")) if folder.is_dir() else set()


def verify_evidence(path: Path) -> tuple[int, str]:
    """``eps sd verify-evidence FILE``: its exit status and first line of output."""
    done = subprocess.run([str(demo.BIN / "eps"), "sd", "verify-evidence", str(path)],
                          cwd=demo.ROOT, capture_output=True, text=True, timeout=60)
    text = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, text[0] if text else ""


class ForkedSD:
    """A second SD (sd-1's settings and keys, its own store) serving a given chain."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.folder = run_dir / "sd-fork"
        self.port = free_port()
        self.metrics_port = free_port()
        self.role = _FolderRole("sd-fork", "sd", "SD_SETTINGS", self.port, "sd-1")

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/jsonrpc"

    def sd_overlay(self) -> Path:
        overlay = self.folder / "settings"
        overlay.mkdir(parents=True, exist_ok=True)
        (overlay / "zz-chaos-fork.json").write_text(json.dumps({
            "jsonrpc_server": {"bind_address": f"localhost:{self.port}"},
            "directory": {"datastore!": {"type": "embedded", "settings": {
                "path": str(self.folder / "records.sqlite")}}},
            "metrics": {"bind_address": f"localhost:{self.metrics_port}"},
        }, indent=2) + "\n")
        return overlay

    def start(self, chain: list[dict[str, Any]]) -> float:
        """Start on an empty store and submit ``chain`` (signed records, from the root);
        seconds until it serves it."""
        t0 = time.monotonic()
        self.stop()
        store = self.folder / "records.sqlite"
        for path in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
            path.unlink(missing_ok=True)
        process = demo._start_role(self.run_dir, self.role, {"sd-fork": self.sd_overlay()})
        demo._wait_ready(self.run_dir, self.role, process, seconds=60)
        client = GatewayClient(self.port, "sd-1", client_context(demo.CERTS, "hd-1"),
                               timeout=30, keepalive=False)
        result = client.call("submitRecords", {"records": chain})
        if result != "ok":
            raise RuntimeError(f"forked SD refused the chain: {result!r}")
        return time.monotonic() - t0

    def stop(self) -> None:
        pid_file = self.run_dir / "sd-fork.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().strip())
            if demo._alive(pid):
                os.killpg(pid, signal.SIGTERM)
                if not demo._wait_gone(pid, 10):
                    os.killpg(pid, signal.SIGKILL)
                    demo._wait_gone(pid, 5)
        except (ValueError, ProcessLookupError):
            pass
        pid_file.unlink(missing_ok=True)

    def endpoint_overlay(self) -> Path:
        """Settings folder that points an endpoint server at this SD (gossip quicker)."""
        overlay = self.folder / "victim-settings"
        overlay.mkdir(parents=True, exist_ok=True)
        (overlay / "zz-chaos-fork.json").write_text(json.dumps({
            "directory": {"settings": {"endpoints!": [self.url]}},
            "gossip": {"interval": GOSSIP_INTERVAL},
        }, indent=2) + "\n")
        return overlay


class ForkedHistory:
    """
    The fault (see the module docstring).  ``submit_legit(tag)`` signs and submits a
    record to sd-1 (the workload's writer, serialised with the ``rec`` stream);
    ``outcomes(since, until)`` are the traffic's calls that started in that window.
    """

    def __init__(self, network: Network, fork: ForkedSD,
                 submit_legit: Callable[[str], None],
                 outcomes: Callable[[float, float], list[Outcome]]) -> None:
        self.network = network
        self.outcomes = outcomes
        self.fork = fork
        self.submit_legit = submit_legit
        self.signer = RecordWriter(port=3322)  # only its hd-1 signing key is used
        self.sd1 = GatewayClient(3322, "sd-1", client_context(demo.CERTS, "hd-1"),
                                 timeout=10, keepalive=False)
        self.previous_overlay: Path | None = None
        self.alarmed: list[str] = [WITNESS]
        self.t_forked = self.t_switch_back = 0.0
        self.tag = f"chaos-fork-{time.time_ns()}"

    def fault(self) -> Fault:
        return Fault(FORK_FAULT, (VICTIM,), before=self.before, during=self.during,
                     after=self.after)

    # -- helpers ------------------------------------------------------------------------

    def _sd1_chain(self) -> list[dict[str, Any]]:
        return list(self.sd1.call("getRecords", {}))

    def _fork_of(self, prefix: list[dict[str, Any]], tag: str,
                 length: int = 1) -> list[dict[str, Any]]:
        """``prefix`` and then ``length`` records of hd-1's that sd-1 never saw."""
        chain = list(prefix)
        for n in range(length):
            chain.append(self.signer.sign(f"{tag}-{n}", chain[-1]["hash"], name="chaos-fork"))
        return chain

    def _refusals(self) -> dict[str, float]:
        """hd-2's refused views since its start, by reason."""
        counts = {reason: metric(VICTIM, "eps_directory_views_refused_total",
                                 f'reason="{reason}"') for reason in REFUSALS}
        return {reason: count for reason, count in counts.items() if count}

    def _verified(self, role: str) -> int:
        return len(cached_chain(role))

    # -- the fault's steps --------------------------------------------------------------

    def before(self, r: FaultResult) -> None:
        """Phase 1 set-up: the forked SD holds B at N+1; sd-1 gets A there, hd-2 verifies it."""
        prefix = self._sd1_chain()
        n = len(prefix)
        # Longer than anything hd-2 can verify before its kill (the rec stream moves sd-1
        # on 0.5 records/s), so that the refusal is for the different record at n+1.
        took = self.fork.start(self._fork_of(prefix, f"{self.tag}-b1", PHASE1_LENGTH))
        self.submit_legit(f"{self.tag}-a1")
        seen = wait_until(lambda: self._verified(VICTIM) > n, 30)
        if seen is None:
            raise RuntimeError(f"{VICTIM} did not verify record {n + 1} of sd-1 within 30 s")
        r.notes.append(f"forked SD (port {self.fork.port}, sd-1's settings and keys) up with "
                       f"records 1-{n} of sd-1 and {PHASE1_LENGTH} different ones from "
                       f"{n + 1} on in {took:.1f} s; "
                       f"{VICTIM} verified sd-1's record {n + 1} in {seen:.1f} s")

    def during(self, r: FaultResult) -> None:
        self.previous_overlay = self.network.overlays.get(VICTIM)
        self.network.overlays[VICTIM] = self.fork.endpoint_overlay()

    def after(self, r: FaultResult) -> None:
        self.t_forked = time.monotonic()  # hd-2 answers, on the forked SD
        try:
            self._direct(r)
            self._gossip(r)
        finally:
            self.t_switch_back = time.monotonic()
            self._traffic_while_forked(r)
            self._recover(r)
        if r.recovered:
            r.lost = "none (no forked record in sd-1's chain)"

    def _direct(self, r: FaultResult) -> None:
        """hd-2 restarted onto the forked SD must refuse it (a different record N+1)."""
        took = wait_until(lambda: bool(self._refusals()), 30)
        refusals = self._refusals()
        status, checks = readiness(VICTIM)
        if took is None:
            r.recovered = False
            r.notes.append(f"**{VICTIM} did NOT refuse the forked view within 30 s** "
                           f"(/readyz {status} {checks})")
            return
        degraded = "checkpoint" in checks and status == 503
        reasons = ", ".join(sorted(refusals))
        r.notes.append(f"PHASE 1 (direct): {VICTIM} restarted onto the forked SD refused its "
                       f"view (reason {reasons}) by {took + r.ready:.1f} s after its start (its "
                       "first update, which it runs before it answers), /readyz "
                       f"{status}" + (" `checkpoint: degraded`" if degraded
                                      else f" (checks: {checks})")
                       + ", serving on from its verified cache")
        if not degraded:
            r.recovered = False

    def _gossip(self, r: FaultResult) -> None:
        """The forked SD extends hd-2's verified chain with B'; sd-1 gets A'. Gossip?"""
        verified = cached_chain(VICTIM)
        m = len(verified)
        before = {role: evidence_files(role) for role in (VICTIM, WITNESS)}
        self.fork.start(self._fork_of(verified, f"{self.tag}-b2"))
        self.submit_legit(f"{self.tag}-a2")
        t0 = time.monotonic()
        seen: dict[str, float] = {}

        def note(key: str, done: bool) -> None:
            if key not in seen and done:
                seen[key] = time.monotonic() - t0

        def progress() -> bool:
            note("accepted", self._verified(VICTIM) > m
                 and "checkpoint" not in readiness(VICTIM)[1])
            note(WITNESS, self._verified(WITNESS) > m)
            for role in (VICTIM, WITNESS):
                note(f"alarm {role}", metric(role, "eps_checkpoint_conflicts_total") > 0)
            return len(seen) == 4

        wait_until(progress, 60)

        def at(key: str) -> str:
            return f"{seen[key]:.1f} s" if key in seen else "NOT within 60 s"

        r.notes.append(
            f"PHASE 2 (gossip): the forked SD restarted with {VICTIM}'s verified {m} records "
            f"and a different record {m + 1}, sd-1 given its own; {VICTIM} accepted the fork "
            f"after {at('accepted')}, {WITNESS} verified sd-1's after {at(WITNESS)}")
        parts = []
        for role in (VICTIM, WITNESS):
            key = f"alarm {role}"
            if key not in seen:
                r.recovered = False
                parts.append(f"{role} NO ALARM within 60 s")
                continue
            status, checks = readiness(role)
            log = self.network.run_dir / f"{role}.log"
            logged = log.exists() and "split view" in log.read_text(errors="replace")
            parts.append(f"{role} {at(key)} (/readyz {status}"
                         + (" `gossip: split view`" if "gossip" in checks else " NO gossip check")
                         + (", error logged" if logged else ", NO log line") + ")")
        r.notes.append("split-view alarm (eps_checkpoint_conflicts_total) counted from the "
                       f"divergence: {', '.join(parts)} (gossip interval {GOSSIP_INTERVAL:g} s "
                       f"on {VICTIM}, the default 60 s on {WITNESS}: {VICTIM}'s round alarms "
                       "both)")
        others = [role for role in METRICS if role not in (VICTIM, WITNESS)
                  and metric(role, "eps_checkpoint_conflicts_total") > 0]
        if others:
            r.notes.append(f"also alarmed (linked to {VICTIM}): {', '.join(others)}")
        self.alarmed = [VICTIM, WITNESS, *others]
        checked, proved = [], 0
        for role in (VICTIM, WITNESS):
            new = sorted(evidence_files(role) - before[role])
            if not new:
                checked.append(f"{role} NO evidence file")
                r.recovered = False
                continue
            results = [verify_evidence(path) for path in new]
            good = sum(rc == 0 for rc, _ in results)
            proved += good
            checked.append(f"{role} {len(new)} file(s), `eps sd verify-evidence` exit 0 on "
                           f"{good}" + ("" if good else f" ({results[0][1][:100]})"))
        if proved == 0:
            r.recovered = False
        r.notes.append("evidence: " + "; ".join(checked))

    def _traffic_while_forked(self, r: FaultResult) -> None:
        """Checked traffic while hd-2 was on the forked SD (after it answered)."""
        window = self.outcomes(self.t_forked, self.t_switch_back)
        calls = Counter(o.stream for o in window)
        failed = Counter(o.stream for o in window if not o.ok)
        text = ", ".join(f"{s} {failed[s]}/{calls[s]}" for s in sorted(calls))
        r.notes.append(f"traffic while {VICTIM} was on the forked SD "
                       f"({self.t_switch_back - self.t_forked:.0f} s, failed/calls): {text}"
                       + ("" if sum(failed.values()) else " — nothing failed"))

    def _restart(self, role: str, number: int = signal.SIGKILL) -> float:
        self.network.signal(role, number)
        self.network.wait_exit(role, 30)
        return self.network.restart(role)

    def _recover(self, r: FaultResult) -> None:
        """hd-2 back on sd-1; then what it takes to get every node ready again."""
        if self.previous_overlay is None:
            self.network.overlays.pop(VICTIM, None)
        else:
            self.network.overlays[VICTIM] = self.previous_overlay
        up = self._restart(VICTIM)
        refused = wait_until(lambda: bool(self._refusals()), 15)
        status, checks = readiness(VICTIM)
        if refused is not None:
            cache = role_data(VICTIM) / "directory-cache.json"
            if cache.exists():
                shutil.move(str(cache), str(cache.with_suffix(".forked.json")))
            r.notes.append(f"RECOVERY: switched back to sd-1 (restart, up in {up:.1f} s), "
                           f"{VICTIM} refuses sd-1's view as a fork of the forked checkpoint "
                           f"it verified, /readyz {status}: its directory cache moved aside "
                           "(the operator's step; or an sd-admin's reset naming that "
                           "checkpoint) and restarted")
            up = self._restart(VICTIM)
        else:
            r.notes.append(f"RECOVERY: switched back to sd-1, {VICTIM} accepted sd-1's view "
                           f"(/readyz {status})")
        ready = wait_until(partial(_ready, VICTIM), 30)
        r.notes.append(f"{VICTIM} ready "
                       + (f"{up + ready:.1f} s after its start" if ready is not None
                          else f"NOT within 30 s ({readiness(VICTIM)[1]})"))
        if ready is None:
            r.recovered = False
        # The alarm stays until the process restarts (an operator who read the evidence).
        for role in self.alarmed:
            if role == VICTIM or _ready(role):
                continue
            t0 = time.monotonic()
            self._restart(role, signal.SIGTERM)
            back = wait_until(partial(_ready, role), 30)
            r.notes.append(f"{role} stays `gossip: split view` until restarted: after SIGTERM "
                           "and start "
                           + (f"ready in {time.monotonic() - t0:.1f} s" if back is not None
                              else "NOT ready within 30 s"))
            if back is None:
                r.recovered = False
        self.fork.stop()
        if any(record.get("name") == "chaos-fork" for record in self._sd1_chain()):
            r.recovered = False
            r.notes.append("a forked record reached sd-1's chain (?)")
