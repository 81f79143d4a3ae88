"""
Asynchronous calls and ``respond`` (SPEC §13; docs/protocol.md "Asynchronous calls").

The reference documents a pattern it never implemented: a service acknowledges a call
at once and answers later by calling ``respond`` at its own EPS.  :class:`AsyncCalls`
makes it work.  It keeps two tables, one for each end of a call:

- *callee side* (the EPS of the service): when a local service answered the call with
  EPS id ``X`` from caller ``C`` with an acknowledgement (a result object with
  ``"_async": true``, see :func:`~epsproxy.eps.asyncrpc.is_acknowledgement`), :meth:`AsyncCalls.acknowledged`
  notes ``(C, X)``.  When the service later calls ``respond`` with ``X``,
  :meth:`AsyncCalls.respond` takes the entry out (only once) and hands the result to
  ``send_result(C, {"id": X, "result"|"error": …})``, which carries it to the caller's
  EPS as an internal ``_respond`` frame; for ``C`` = the own operator it is delivered
  right here.
- *caller side* (the EPS of the calling application): when the gateway passes an
  acknowledgement for ``X`` from operator ``B`` back to the application, it calls
  :meth:`AsyncCalls.expect`, so that a result for ``X`` is accepted from ``B`` only, once,
  before it expires.  :meth:`AsyncCalls.result_arrived` takes it: a gateway request that
  is still waiting for it (``Prefer: wait=N``, :meth:`AsyncCalls.wait`) gets it as its
  answer; otherwise it is pushed to the own local service as a ``respond`` call.

Entries expire after ``expire_after`` seconds and each table holds at most
``max_pending`` entries (the oldest is dropped, with a warning).  Results are never
logged, only ids (cut short) and operator names.

This module is the tables and what happens to a result; the JSON-RPC-facing parts (error
codes, recognising an acknowledgement, checking ``respond`` and ``_respond`` params, the
acknowledging channel) are in :mod:`epsproxy.eps.asyncrpc`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.eps.asyncrpc import (
    AMBIGUOUS,
    BAD_RESULT,
    DELIVERY_FAILED,
    MAX_ID_LENGTH,
    NOT_FOUND,
    AsyncCallError,
    check_id,
    check_result,
    external_outcome,
    network_outcome,
    short_id,
)
from epsproxy.net.jsonrpc.envelope import INVALID_PARAMS, NO_RESULT, JSONRPCError, id_from_internal

__all__ = ["AsyncCalls"]

log = Logger()

# ------------------------------------------------------------------------- the tables


@dataclass
class _Acknowledged:
    """Callee side: ``caller`` waits for the answer to ``eps_id``."""

    caller: str
    eps_id: str
    deadline: float


@dataclass
class _Waiter:
    """A gateway request waiting for an expected result."""

    deferred: defer.Deferred[dict[str, Any] | None]
    timer: IDelayedCall | None = None


@dataclass
class _Expected:
    """Caller side: the result for ``eps_id`` may come from ``operator``."""

    operator: str
    eps_id: str
    local_id: str
    deadline: float
    waiter: _Waiter | None = field(default=None)


SendResult = Callable[[str, dict[str, Any]], Any]
Push = Callable[..., Any]


class AsyncCalls:
    """
    The asynchronous calls of one EPS (see the module docstring).

    ``clock`` gives the time for expiry and waiting; ``own_name`` is the own operator;
    ``send_result(caller, {"id", "result"|"error"})`` carries a result to the caller's
    EPS (may return a Deferred; a failure is reported to the service);
    ``push(method="respond", params={"id", "result"|"error"}, id=X)`` calls the own
    local service.  Both may be set later as attributes.

    Counters (for metrics): ``acknowledged``, ``expected``, ``responded`` (results a
    service gave), ``sent`` (results passed on by ``send_result``), ``send_failed``,
    ``delivered`` (results handed to the calling application: to a waiting request or
    pushed), ``push_failed``, ``dropped`` (no push configured), ``expired``, ``evicted``
    (over the cap), ``refused`` (unknown ids, wrong peers, malformed results).
    """

    def __init__(
        self,
        clock: IReactorTime,
        own_name: str,
        send_result: SendResult | None = None,
        push: Push | None = None,
        expire_after: float = 3600.0,
        max_pending: int = 100_000,
    ) -> None:
        if expire_after <= 0:
            raise ValueError("expire_after must be positive")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.clock = clock
        self.own_name = own_name
        self.send_result = send_result
        self.push = push
        self.expire_after = expire_after
        self.max_pending = max_pending
        # Both tables are in insertion order, which is deadline order (constant expiry).
        self._acknowledged: OrderedDict[tuple[str, str], _Acknowledged] = OrderedDict()
        self._callers: dict[str, set[str]] = {}
        self._expected: OrderedDict[tuple[str, str], _Expected] = OrderedDict()
        self.acknowledged_count = 0
        self.expected_count = 0
        self.responded = 0
        self.sent = 0
        self.send_failed = 0
        self.delivered = 0
        self.push_failed = 0
        self.dropped = 0
        self.expired = 0
        self.evicted = 0
        self.refused = 0

    # -- sizes and housekeeping --------------------------------------------------------

    @property
    def pending_acknowledged(self) -> int:
        """Calls this EPS's services acknowledged and have not answered yet."""
        return len(self._acknowledged)

    @property
    def pending_expected(self) -> int:
        """Results this EPS's applications are still expecting."""
        return len(self._expected)

    def purge(self) -> int:
        """Drop expired entries of both tables; returns how many.  Cheap; call at will."""
        now = self.clock.seconds()
        count = 0
        while self._acknowledged:
            key, entry = next(iter(self._acknowledged.items()))
            if entry.deadline > now:
                break
            self._forget_acknowledged(key)
            log.info("asynchronous call {eps_id} from {caller} expired unanswered",
                     eps_id=short_id(entry.eps_id), caller=entry.caller)
            count += 1
        while self._expected:
            key, expected = next(iter(self._expected.items()))
            if expected.deadline > now:
                break
            self._expected.pop(key)
            self._release(expected)
            log.info("expected result for {eps_id} from {operator} never came",
                     eps_id=short_id(expected.eps_id), operator=expected.operator)
            count += 1
        self.expired += count
        return count

    def _forget_acknowledged(self, key: tuple[str, str]) -> _Acknowledged:
        entry = self._acknowledged.pop(key)
        callers = self._callers.get(entry.eps_id)
        if callers is not None:
            callers.discard(entry.caller)
            if not callers:
                del self._callers[entry.eps_id]
        return entry

    @staticmethod
    def _release(expected: _Expected) -> None:
        """Let a request still waiting for ``expected`` go with the acknowledgement."""
        waiter, expected.waiter = expected.waiter, None
        if waiter is not None:
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            if not waiter.deferred.called:
                waiter.deferred.callback(None)

    # -- callee side ---------------------------------------------------------------------

    def acknowledged(self, caller: str, eps_id: str) -> None:
        """
        A local service acknowledged the call ``eps_id`` from operator ``caller``: its
        ``respond`` for ``eps_id`` will be accepted once, within ``expire_after``.  The
        same (caller, id) again starts the wait anew.
        """
        if not isinstance(caller, str) or not isinstance(eps_id, str):
            raise TypeError("caller and eps_id must be strings")
        if not caller or not eps_id or len(eps_id) > MAX_ID_LENGTH:
            log.warn("not noting an acknowledgement with an empty or oversized id/caller")
            return
        self.purge()
        key = (caller, eps_id)
        if key in self._acknowledged:
            self._forget_acknowledged(key)
        elif len(self._acknowledged) >= self.max_pending:
            oldest = next(iter(self._acknowledged))
            dropped = self._forget_acknowledged(oldest)
            self.evicted += 1
            log.warn("too many unanswered asynchronous calls ({limit}): forgot {eps_id} "
                     "from {caller}", limit=self.max_pending,
                     eps_id=short_id(dropped.eps_id), caller=dropped.caller)
        self._acknowledged[key] = _Acknowledged(
            caller, eps_id, self.clock.seconds() + self.expire_after
        )
        self._callers.setdefault(eps_id, set()).add(caller)
        self.acknowledged_count += 1
        log.debug("call {eps_id} from {caller} acknowledged, answer expected later",
                  eps_id=short_id(eps_id), caller=caller)

    def respond(
        self,
        eps_id: str,
        result: Any = NO_RESULT,
        error: dict[str, Any] | None = None,
        caller: str | None = None,
    ) -> defer.Deferred[dict[str, Any]]:
        """
        A local service answers the acknowledged call ``eps_id`` with ``result`` or
        ``error`` (exactly one; ``result`` is :data:`~epsproxy.net.jsonrpc.NO_RESULT` when
        absent).  Fires with ``{"message": "delivered"}`` once the result was passed on;
        fails with :class:`JSONRPCError`: ``INVALID_PARAMS`` for malformed arguments,
        :data:`NOT_FOUND` for an id nobody waits for (unknown, expired or already
        answered), :data:`AMBIGUOUS` when several callers wait and ``caller`` is not
        given, :data:`DELIVERY_FAILED` when the result could not be passed on (the
        entry is gone then: a call is answered at most once).
        """
        try:
            check_id(eps_id, "id")
            outcome = network_outcome(result, error)
        except ValueError as e:
            self.refused += 1
            return defer.fail(JSONRPCError(INVALID_PARAMS, f"invalid params: {e}"))
        self.purge()
        callers = self._callers.get(eps_id, set())
        if caller is not None:
            callers = callers & {caller}
        if not callers:
            self.refused += 1
            log.info("respond for {eps_id}: no such call is waiting", eps_id=short_id(eps_id))
            return defer.fail(JSONRPCError(
                NOT_FOUND,
                f"no asynchronous call with id {short_id(eps_id)!r} is waiting for a response",
            ))
        if len(callers) > 1:
            self.refused += 1
            return defer.fail(JSONRPCError(
                AMBIGUOUS,
                f"several callers wait for {short_id(eps_id)!r}: say which in params.client "
                "(the _client.name the call came with)",
            ))
        (target,) = callers
        self._forget_acknowledged((target, eps_id))
        self.responded += 1
        message = {"id": eps_id, **outcome}
        if target == self.own_name:
            return self._respond_locally(message)
        if self.send_result is None:
            self.send_failed += 1
            log.warn("cannot send the result for {eps_id} to {caller}: no connection to "
                     "other operators", eps_id=short_id(eps_id), caller=target)
            return defer.fail(JSONRPCError(
                DELIVERY_FAILED,
                f"cannot send the result to {target}: no connection to other operators",
            ))

        def sent(_: Any) -> dict[str, Any]:
            self.sent += 1
            log.debug("result for {eps_id} sent to {caller}",
                      eps_id=short_id(eps_id), caller=target)
            return {"message": "delivered"}

        def failed(failure: Failure) -> Failure:
            self.send_failed += 1
            reason = failure.getErrorMessage()[:300]
            log.warn("cannot send the result for {eps_id} to {caller}: {reason}",
                     eps_id=short_id(eps_id), caller=target, reason=reason)
            return Failure(JSONRPCError(
                DELIVERY_FAILED, f"cannot send the result to {target}: {reason}"
            ))

        d = defer.maybeDeferred(self.send_result, target, message)
        return d.addCallbacks(sent, failed)

    def _respond_locally(self, message: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        """The caller is our own operator: hand the result over without the network."""
        try:
            answer = self.result_arrived(self.own_name, message)
        except AsyncCallError as e:
            self.send_failed += 1
            return defer.fail(JSONRPCError(DELIVERY_FAILED, e.message))
        self.sent += 1
        return defer.succeed(answer)

    # -- caller side ---------------------------------------------------------------------

    def expect(self, operator: str, eps_id: str, local_id: str) -> None:
        """
        An application called ``eps_id`` at ``operator`` and got an acknowledgement: a
        result for ``eps_id`` is accepted from ``operator`` (only) once, within
        ``expire_after``.  ``local_id`` is the application's own id (internal form), put
        back into the pushed ``respond``.  The same (operator, id) again replaces the
        earlier entry (a request still waiting for it gets the acknowledgement).
        """
        if not all(isinstance(v, str) for v in (operator, eps_id, local_id)):
            raise TypeError("operator, eps_id and local_id must be strings")
        if not operator or not eps_id or len(eps_id) > MAX_ID_LENGTH:
            log.warn("not expecting a result with an empty or oversized id/operator")
            return
        self.purge()
        key = (operator, eps_id)
        previous = self._expected.pop(key, None)
        if previous is not None:
            self._release(previous)
        elif len(self._expected) >= self.max_pending:
            _, dropped = self._expected.popitem(last=False)
            self._release(dropped)
            self.evicted += 1
            log.warn("too many expected asynchronous results ({limit}): forgot {eps_id} "
                     "from {operator}", limit=self.max_pending,
                     eps_id=short_id(dropped.eps_id), operator=dropped.operator)
        self._expected[key] = _Expected(
            operator, eps_id, local_id, self.clock.seconds() + self.expire_after
        )
        self.expected_count += 1
        log.debug("expecting a result for {eps_id} from {operator}",
                  eps_id=short_id(eps_id), operator=operator)

    def wait(
        self, operator: str, eps_id: str, seconds: float
    ) -> defer.Deferred[dict[str, Any] | None]:
        """
        Wait up to ``seconds`` for the expected result of ``eps_id`` from ``operator``.
        Fires with ``{"result": v}`` or ``{"error": {...}}`` (values unwrapped, as the
        application should see them), or with None when nothing came in time (the
        result will then be pushed when it comes) or nothing is expected.  Cancelling
        the Deferred (the application went away) also leaves the result to the push.
        """
        self.purge()
        expected = self._expected.get((operator, eps_id))
        if expected is None or seconds <= 0:
            return defer.succeed(None)
        if expected.waiter is not None:
            self._release(expected)

        def cancel(d: defer.Deferred[Any]) -> None:
            if expected.waiter is waiter:
                expected.waiter = None
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()

        waiter = _Waiter(defer.Deferred(cancel))

        def timed_out() -> None:
            if expected.waiter is waiter:
                expected.waiter = None
            if not waiter.deferred.called:
                log.debug("no result for {eps_id} within {seconds:g}s; it will be pushed",
                          eps_id=short_id(eps_id), seconds=seconds)
                waiter.deferred.callback(None)

        waiter.timer = self.clock.callLater(seconds, timed_out)
        expected.waiter = waiter
        return waiter.deferred

    def result_arrived(self, peer_name: str, params: Any) -> dict[str, Any]:
        """
        Peer ``peer_name`` sends the result of an asynchronous call: ``params`` is
        ``{"id": X, "result": {...}}`` or ``{"id": X, "error": {code, message, data?}}``
        in network form (result and data objects; other keys are ignored).  Only the
        operator the call went to can answer it, once, before it expires.  Returns
        ``{"message": "delivered"}``; raises :class:`AsyncCallError` (code
        :data:`BAD_RESULT` or :data:`NOT_FOUND`) to refuse.
        """
        try:
            outcome = check_result(params)
        except ValueError as e:
            self.refused += 1
            log.info("refused a malformed asynchronous result from {peer}: {reason}",
                     peer=str(peer_name)[:200], reason=str(e))
            raise AsyncCallError(BAD_RESULT, f"invalid result: {e}") from None
        eps_id = params["id"]
        self.purge()
        expected = self._expected.pop((peer_name, eps_id), None)
        if expected is None:
            self.refused += 1
            log.info("refused a result for {eps_id} from {peer}: not expected from it",
                     eps_id=short_id(eps_id), peer=str(peer_name)[:200])
            raise AsyncCallError(
                NOT_FOUND,
                f"no asynchronous call with id {short_id(eps_id)!r} is waiting for a "
                "response from you",
            )
        external = external_outcome(outcome)
        waiter, expected.waiter = expected.waiter, None
        if waiter is not None and not waiter.deferred.called:
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            self.delivered += 1
            log.debug("result for {eps_id} from {peer} answers the waiting request",
                      eps_id=short_id(eps_id), peer=peer_name)
            waiter.deferred.callback(external)
        else:
            self._push(expected, external)
        return {"message": "delivered"}

    def _push(self, expected: _Expected, outcome: dict[str, Any]) -> None:
        """Hand a result nobody waits for to the own local service (``respond``)."""
        eps_id = expected.eps_id
        push = self.push
        if push is None:
            self.dropped += 1
            log.warn("result for {eps_id} from {operator} dropped: no local service to "
                     "push it to", eps_id=short_id(eps_id), operator=expected.operator)
            return
        params = {"id": id_from_internal(expected.local_id), **outcome}

        def pushed(_: Any) -> None:
            self.delivered += 1
            log.debug("result for {eps_id} pushed to the local service",
                      eps_id=short_id(eps_id))

        def failed(failure: Failure) -> None:
            self.push_failed += 1
            log.warn("cannot push the result for {eps_id} to the local service: {reason}",
                     eps_id=short_id(eps_id), reason=failure.getErrorMessage()[:300])

        d = defer.maybeDeferred(push, method="respond", params=params, id=eps_id)
        d.addCallbacks(pushed, failed)
