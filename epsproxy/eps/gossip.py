"""
Checkpoint gossip between endpoint servers (issue 15 item 3).

Every ``interval`` seconds an endpoint server sends each peer it has an open link to its
latest verified checkpoint (``<peer>._checkpoint``, through its own broker like any call,
so the peer answers it only if its directory entry lets us call ``_checkpoint``); the
peer answers with its own.  Each side compares the other's checkpoint with its own chain
(:meth:`~epsproxy.directory.checkpoints.CheckpointGuard.conflict`).  Two checkpoints
that cannot both be true raise the alarm: an error log line, the counter
``eps_checkpoint_conflicts_total``, a readiness check (:attr:`Gossip.alarm`) and an
evidence file (:mod:`epsproxy.eps.evidence`).  The side that can prove the conflict
tells the other in its answer (``conflict``) or with one more ``_checkpoint`` call, so
both sides raise the alarm.  A checkpoint older than the reset our chain starts with is
ignored, and a conflict with a checkpoint as new as ours or newer counts only once an
update from our SD has not resolved it (we may just be behind a reset).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from epsproxy.directory.api import APIDirectory
from epsproxy.directory.checkpoints import Verified, ViewRefused, short
from epsproxy.directory.entries import can_call
from epsproxy.eps.broker import ClientInfo, Request, Response
from epsproxy.eps.evidence import evidence, write_evidence
from epsproxy.net.reactor import IReactor
from epsproxy.rules import forms

__all__ = ["CHECKPOINT_METHOD", "Gossip", "GossipError"]

log = Logger()

#: The internal method that carries a checkpoint between endpoint servers.
CHECKPOINT_METHOD = "_checkpoint"

_MESSAGE = forms.Map(
    {
        "checkpoint": forms.Required(forms.String(min_length=1, max_length=16384)),
        "certificates": forms.Required(
            forms.List(forms.String(max_length=65536), max_length=32)),
        "conflict": forms.Optional(forms.String(max_length=2000)),
    },
    strict=False,  # the broker adds _client
)


class GossipError(Exception):
    """A ``_checkpoint`` call cannot be answered (no checkpoint yet, malformed params)."""


Send = Callable[[Request, ClientInfo], "defer.Deferred[Response | None]"]


class Gossip:
    """
    Gossip of ``directory``'s checkpoints for the node ``own_name``.  ``send`` delivers a
    request through the node's broker as its own caller (the inbox's ``deliver``);
    ``peers()`` names the peers linked to now; evidence goes to ``evidence_dir``.
    """

    def __init__(self, reactor: IReactor, directory: APIDirectory, own_name: str,
                 send: Send, peers: Callable[[], Iterable[str]],
                 evidence_dir: Path | None, interval: float = 60.0,
                 registry: CollectorRegistry | None = None) -> None:
        self.reactor = reactor
        self.directory = directory
        self.name = own_name
        self._send = send
        self._peers = peers
        self.evidence_dir = evidence_dir
        self.interval = interval
        #: Why gossip found a split view (None: it found none); readiness reports it.
        self.alarm: str | None = None
        #: The evidence files written.
        self.evidence: list[Path] = []
        self._seen: set[tuple[str, str]] = set()
        #: Comparisons waiting for a directory update (Deferreds firing with the result).
        self.rechecks: list[defer.Deferred[Any]] = []
        self._listeners: list[Callable[[str], None]] = []
        self._loop: LoopingCall | None = None
        self._conflicts = Counter(
            "eps_checkpoint_conflicts", "checkpoints from peers that contradict ours",
            registry=registry if registry is not None else CollectorRegistry())

    def start(self) -> None:
        """Gossip every ``interval`` seconds (the first round after one interval)."""
        self._loop = LoopingCall(self.round)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` when the alarm is raised."""
        self._listeners.append(listener)

    # -- sending ------------------------------------------------------------------------

    def round(self) -> defer.Deferred[None]:
        """One exchange with each linked peer; errors are logged, never raised."""
        exchanges = [self.exchange(peer) for peer in sorted(set(self._peers()))
                     if peer != self.name and self.may_gossip_with(peer)]
        return defer.DeferredList(exchanges, consumeErrors=True).addCallback(lambda _: None)

    def may_gossip_with(self, peer: str) -> bool:
        """
        Whether the directory lets us call ``peer``'s ``_checkpoint``: peers that do not
        offer it (a service operator, a proxy) are not asked, so a round leaves no
        refused calls on either side.
        """
        try:
            return can_call(self.directory.own_entry(), self.directory.entry_for(peer),
                            CHECKPOINT_METHOD)
        except Exception:  # no entry (yet) for us or for it
            return False

    def _message(self, conflict: str | None = None) -> dict[str, Any] | None:
        verified = self.directory.checkpoint
        if verified is None:
            return None
        message = verified.as_json()
        if conflict is not None:
            message["conflict"] = conflict
        return message

    @defer.inlineCallbacks
    def exchange(self, peer: str) -> Any:
        """Send ``peer`` our checkpoint and compare the one it answers with; fires with
        the conflict found (or None).  Failures are logged and fire None."""
        message = self._message()
        if message is None:
            return None
        try:
            response = yield self._call(peer, message)
        except Exception as e:
            log.debug("checkpoint gossip with {peer} failed: {error}", peer=peer, error=str(e))
            return None
        if response is None or response.error is not None or not isinstance(
            response.result, dict
        ):
            error = None if response is None else response.error
            log.debug("{peer} did not answer _checkpoint: {error}", peer=peer, error=error)
            return None
        found = self._compare(peer, response.result)
        if found is not None and not response.result.get("conflict"):
            # It could not tell: tell it, so that both sides raise the alarm.
            notice = self._message(found)
            if notice is not None:
                try:
                    yield self._call(peer, notice)
                except Exception as e:
                    log.warn("could not tell {peer} about the conflict: {error}",
                             peer=peer, error=str(e))
        return found

    def _call(self, peer: str, message: dict[str, Any]) -> defer.Deferred[Response | None]:
        method = f"{peer}.{CHECKPOINT_METHOD}"
        request = Request(method, message, f"{method}({secrets.token_hex(8)})")
        return self._send(request, ClientInfo(self.name, self.directory.own_entry()))

    # -- receiving ----------------------------------------------------------------------

    def receive(self, params: dict[str, Any] | None, caller: str) -> dict[str, Any]:
        """Answer a peer's ``_checkpoint``: compare its checkpoint, answer with ours."""
        try:
            message = _MESSAGE.validate(params or {})
        except forms.FormError as e:
            raise GossipError(f"invalid _checkpoint params: {e}") from None
        found = self._compare(caller, message)
        answer = self._message(found)
        if answer is None:
            raise GossipError("this endpoint server has verified no checkpoint yet")
        return answer

    # -- comparing ----------------------------------------------------------------------

    def _compare(self, peer: str, message: dict[str, Any], recheck: bool = True) -> str | None:
        """
        The conflict between ``message`` and our chain, alarm raised; None if none (or
        not yet: a conflict with a newer checkpoint is checked again after an update,
        in :attr:`rechecks`).
        """
        directory = self.directory
        ours = directory.checkpoint
        if ours is None:
            return None
        try:
            found = directory.guard.conflict(message, directory.head_at, directory.pinned,
                                             directory.reset_at)
        except ViewRefused as e:
            log.warn("{peer} gossiped a checkpoint that does not verify: {reason}",
                     peer=peer, reason=str(e))
            return None
        if found is None:
            claim = message.get("conflict")
            if isinstance(claim, str) and claim:
                return self._claimed(peer, message, claim)
            return None
        theirs, reason = found
        known = (ours.signed.text, theirs.signed.text) in self._seen
        if recheck and not known and theirs.checkpoint.time >= ours.checkpoint.time:
            # Theirs is as new or newer: we may only be behind (a reset not fetched yet).
            # Update from our SD first; the conflict counts only if it remains.
            self.rechecks = [d for d in self.rechecks if not d.called]
            if not self.rechecks:
                self.rechecks.append(directory.update().addBoth(
                    lambda _: self._confirm(peer, message)))
            return None
        # Our chain is the longer (or as long): its records prove the conflict.
        chain = directory.records[: ours.checkpoint.size]
        self._raise(peer, reason, ours, theirs, chain)
        return reason

    def _confirm(self, peer: str, message: dict[str, Any]) -> str | None:
        """Compare again after an update; tell the peer if the conflict remains."""
        reason = self._compare(peer, message, recheck=False)
        notice = None if reason is None else self._message(reason)
        if notice is not None:
            try:
                self._call(peer, notice).addErrback(
                    lambda f: log.warn("could not tell {peer} about the conflict: {error}",
                                       peer=peer, error=f.getErrorMessage()))
            except Exception as e:
                log.warn("could not tell {peer} about the conflict: {error}",
                         peer=peer, error=str(e))
        return reason

    def _claimed(self, peer: str, message: dict[str, Any], claim: str) -> str | None:
        """A peer says our checkpoint contradicts its chain; believe only what can be."""
        directory = self.directory
        ours = directory.checkpoint
        assert ours is not None
        try:
            theirs = directory.guard.verify_note(message, directory.pinned)
        except ViewRefused:
            return None
        if theirs is None or theirs.checkpoint.size <= ours.checkpoint.size:
            # We could check it against our chain and it agreed: the claim is false.
            log.warn("{peer} claims a conflict our chain does not show: {claim}",
                     peer=peer, claim=claim[:300])
            return None
        reason = f"{peer} reports that our checkpoint is not in its chain: {claim[:300]}"
        self._raise(peer, reason, ours, theirs, ())
        return reason

    def _raise(self, peer: str, reason: str, ours: Verified, theirs: Verified,
               chain: Iterable[dict]) -> None:
        key = (ours.signed.text, theirs.signed.text)
        if key in self._seen:
            return
        self._seen.add(key)
        self._conflicts.inc()
        self.alarm = (f"split view: checkpoint {short(theirs.checkpoint)} from {peer} "
                      f"contradicts ours {short(ours.checkpoint)}: {reason}")
        log.error("{alarm}", alarm=self.alarm)
        if self.evidence_dir is not None:
            document = evidence(reason, self.name, peer, self.reactor.seconds(),
                                [ours.as_json(), theirs.as_json()], list(chain))
            try:
                path = write_evidence(self.evidence_dir, document)
            except OSError as e:
                log.error("cannot save the evidence in {folder}: {error}",
                          folder=str(self.evidence_dir), error=e.strerror or str(e))
            else:
                self.evidence.append(path)
                log.error("evidence of the split view saved in {path}", path=str(path))
        for listener in list(self._listeners):
            try:
                listener(self.alarm)
            except Exception:
                log.failure("gossip alarm listener failed")
