"""
The ``api`` directory back-end of an EPS (SPEC §7.2): the directory learnt from the
service directory (SD) over JSON-RPC, verified record by record, kept in memory and
(optionally) in a cache file.

:class:`APIDirectory` keeps a :class:`~epsproxy.directory.chain.VerifiedChain` and
asks the SD for the records after its tip every ``cache_entries_for`` seconds.  Queries
never wait for the network: they answer from memory.

Better than the reference (SPEC §23.3 #28):

- the chain's links are checked (``parent_hash`` of each record is the previous hash),
  so an SD cannot drop or reorder individually signed records;
- every endpoint is used, in order, until one answers (each with its own TLS server
  name), not only the first;
- ``last_success`` is set only after a verified update, so a failed fetch is retried at
  the next tick instead of being suppressed for a cache period;
- a failed update keeps the previous data in service; the data going stale is warned
  about once and its recovery logged;
- the verified records can be kept in a cache file (written atomically, mode 0600) and
  are re-verified in full when loaded, so an EPS can start while the SD is down;
- it never goes back (issue 15): each view comes with the SD's signed checkpoint, and a
  view that does not extend the last checkpoint verified (kept in the cache file too) is
  refused, counted (``eps_directory_views_refused_total``) and kept in :attr:`refusal`
  while the verified data stays in service (:mod:`epsproxy.directory.checkpoints`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Generator, Protocol, Sequence
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.defer import Deferred, DeferredLock, gatherResults, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.rules import forms, records
from epsproxy.rules import checkpoint as cp
from epsproxy.directory.chain import ChainError, VerifiedChain, created_at_key
from epsproxy.directory.checkpoints import (
    CheckpointGuard, Verified, View, ViewRefused, short, signers_for,
)
from epsproxy.directory.jsondir import DirectoryError, answer_query
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.net.jsonrpc.envelope import JSONRPCError, TransportError
from epsproxy.net.reactor import IReactor

__all__ = ["APIDirectory", "APIDirectoryError", "UpdateError", "MAX_CACHE_BYTES", "STALE_AFTER_PERIODS"]

log = Logger()

#: Largest cache file read (bytes); a bigger one is ignored.
MAX_CACHE_BYTES = 64 * 1024 * 1024


class APIDirectoryError(DirectoryError):
    """A failure of the api directory (a :class:`DirectoryError`)."""


class UpdateError(APIDirectoryError):
    """An update from the SD failed; the previous data stays in service."""


def _server_name(index: int, url: str, server_names: Sequence[str]) -> str | None:
    if index < len(server_names):
        return server_names[index]
    if server_names:
        return server_names[0]
    return urlsplit(url).hostname


class _Client(Protocol):
    """What the directory uses of a JSON-RPC client (:class:`JSONRPCClient`, or a fake)."""

    def call(self, method: str, params: dict[str, Any]) -> Deferred[Any]: ...

    def close(self) -> Deferred[None]: ...


def _make_clients(reactor: IReactor, settings: dict[str, Any]) -> list[_Client]:
    client_settings = settings["jsonrpc_client"]
    clients: list[_Client] = []
    for i, url in enumerate(settings["endpoints"]):
        raw = {
            "endpoint": url,
            "tls": client_settings["tls"],
            "timeout": client_settings.get("timeout", 10.0),
        }
        name = _server_name(i, url, settings.get("server_names") or [])
        if name:
            raw["server_name"] = name
        if client_settings.get("proxy_url") is not None:
            raw["proxy_url"] = client_settings["proxy_url"]
        clients.append(JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate(raw)))
    return clients


#: The directory is stale (not ready) after this many update periods without a
#: successful update (``cache_entries_for`` seconds each, at least 1).
STALE_AFTER_PERIODS = 3


class APIDirectory:
    """
    Directory entries from the SD (SPEC §7.2), verified and kept up to date.

    ``settings`` are validated ``API_DIRECTORY_SETTINGS``; ``own_name`` is our operator
    name.  ``clients`` (one JSON-RPC client per endpoint, with ``call`` and ``close``)
    replaces the real clients in tests; ``registry`` gets the refusal counter;
    ``witness`` (our signing key and certificate PEM) makes this node cosign each new
    checkpoint it verified and send the cosignature to the SD (``submitCosignature``).
    Call :meth:`start` once, :meth:`stop` at the end.
    """

    def __init__(
        self,
        reactor: IReactor,
        settings: dict[str, Any],
        own_name: str,
        clients: Sequence[_Client] | None = None,
        registry: CollectorRegistry | None = None,
        witness: tuple[Any, str] | None = None,
    ) -> None:
        self._reactor = reactor
        self._settings = settings
        self.name = own_name
        self.period = max(1, int(settings.get("cache_entries_for", 5)))
        cache = settings.get("cache_file")
        self.cache_file = Path(cache) if cache else None
        self._trust = records.TrustStore.from_files(
            settings["ca_certificate_files"],
            settings.get("ca_intermediate_certificate_files") or [],
        )
        self._endpoints = list(settings["endpoints"])
        self._clients = list(clients) if clients is not None else _make_clients(reactor, settings)
        self._chain = VerifiedChain(self._trust)
        self._lock = DeferredLock()
        self._loop: LoopingCall | None = None
        self._listeners: list[Callable[[], None]] = []
        self._started_at: float | None = None
        self._stale_warned = False
        self.last_success: float | None = None
        witnesses = settings.get("witnesses") or {}
        self.guard = CheckpointGuard(
            settings.get("checkpoints", "optional"),
            signers_for(settings, (urlsplit(u).hostname or "" for u in self._endpoints)),
            self._trust,
            witnesses.get("names", []), witnesses.get("required", 0),
        )
        self._cached_note: str | None = None
        self._witness = witness
        self._cosigned: cp.Checkpoint | None = None
        #: Why the last view the SD served was refused (None: the last one was accepted).
        self.refusal: str | None = None
        self._refused = Counter(
            "eps_directory_views_refused", "views of the directory refused (by reason)",
            ["reason"], registry=registry if registry is not None else CollectorRegistry())

    # -- life cycle -------------------------------------------------------------------

    @inlineCallbacks
    def start(self) -> Generator[Deferred[Any], Any, None]:
        """
        Load the cache file (if any), try one update (failure only logged), then update
        every ``cache_entries_for`` seconds (at least 1).  Fires when the first update
        attempt is over.
        """
        self._started_at = self._reactor.seconds()
        if self.cache_file is not None:
            self._load_cache()
        yield self._tick()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self.period, now=False)

    def stop(self) -> Deferred[None]:
        """
        Stop updating and close the connections to the SD, once an update in progress
        is over (it ends within the client timeout).
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

        def close(_: object) -> Deferred[None]:
            closes = [c.close() for c in self._clients]
            return gatherResults(closes).addCallback(lambda _: None)

        # The lock is free once no update is running: take and release it, then close.
        return self._lock.run(lambda: None).addCallback(close)

    def reconfigure(self, settings: dict[str, Any]) -> Deferred[None]:
        """
        Use ``settings`` (validated ``API_DIRECTORY_SETTINGS`` with the same endpoints and
        CA files) from the next update on: new clients to the SD when ``jsonrpc_client``
        changed (built first: unusable TLS files raise ``TLSSettingsError`` and nothing
        changes), and the update period of ``cache_entries_for``.  Fires when the old
        clients are closed.
        """
        old = self._settings
        closing: list[Deferred[None]] = []
        if settings["jsonrpc_client"] != old["jsonrpc_client"] or (
            settings.get("server_names") != old.get("server_names")
        ):
            clients = _make_clients(self._reactor, settings)
            closing = [c.close() for c in self._clients]
            self._clients = clients
        period = max(1, int(settings.get("cache_entries_for", 5)))
        if period != self.period:
            self.period = period
            loop = self._loop
            if loop is not None and loop.running:
                loop.stop()
                loop.start(period, now=False)
        self._settings = settings
        return gatherResults(closing).addCallback(lambda _: None)

    def stale_after(self) -> float:
        """
        Seconds without a successful update after which the data counts as stale for
        readiness: :data:`STALE_AFTER_PERIODS` update periods.
        """
        return STALE_AFTER_PERIODS * self.period

    def _tick(self) -> Deferred[None]:
        """One update whose errors are logged, never raised (keeps the loop alive)."""

        def failed(failure: Failure) -> None:
            if failure.check(UpdateError):
                log.warn("directory update failed, keeping previous data: {error}",
                         error=str(failure.value))
            else:
                log.failure("directory update crashed", failure)

        return self.update().addCallbacks(lambda _: None, failed).addBoth(self._check_age)

    # -- public interface (SPEC §7) ---------------------------------------------------

    def entries(self, query: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """
        The entries matching ``query`` (keys ``group``, ``operator``, ``channels``; SPEC
        §6.3), or all entries, from memory.  The dicts returned are copies.
        """
        return answer_query(self._chain.entries, query, APIDirectoryError)

    def entry_for(self, name: str) -> dict[str, Any]:
        """
        The entry of operator ``name``; :class:`DirectoryError` if none.  The dict is the
        directory's own (no copy: this is on every call's path) and must not be changed.
        """
        entry = self._chain.entries.get(name)
        if entry is None:
            raise APIDirectoryError(f"no directory entry found for {name}")
        return entry

    def own_entry(self) -> dict[str, Any]:
        """Our own entry (``entry_for(self.name)``)."""
        return self.entry_for(self.name)

    @property
    def tip_hash(self) -> str:
        """The hash of the last verified record, ``""`` if none."""
        return self._chain.tip_hash

    @property
    def checkpoint(self) -> Verified | None:
        """The last checkpoint verified (None: none yet)."""
        return self.guard.verified

    def head_at(self, size: int) -> bytes | None:
        """The chain head of the first ``size`` verified records (None beyond them)."""
        return self._chain.head_at(size)

    def pinned(self, name: str) -> str | None:
        """The signing fingerprint the verified chain pins for ``name``."""
        return self._chain.pins.pinned(name)

    @property
    def reset_at(self) -> float | None:
        """
        POSIX time of the reset the verified chain starts with (its root names the
        checkpoint it replaced), None if it starts with no such reset.
        """
        records_ = self._chain.records
        if not records_ or cp.replaced_by(records_[0]["record"]) is None:
            return None
        return created_at_key(records_[0]["record"]["created_at"]) / 1e9

    @property
    def records(self) -> list[dict]:
        """The verified records in chain order (read only)."""
        return self._chain.records

    def is_stale(self, max_age: float) -> bool:
        """Whether the last successful update is more than ``max_age`` seconds old (or none)."""
        if self.last_success is None:
            return True
        return self._reactor.seconds() - self.last_success > max_age

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after each change of the entries."""
        self._listeners.append(listener)

    # -- writable interface (SPEC §7.2) ------------------------------------------------

    @inlineCallbacks
    def tip(self) -> Generator[Deferred[Any], Any, dict[str, Any] | None]:
        """The SD's last record (validated as a signed change record), or None."""
        result = yield self._call("getTip", {}, fail_over=True)
        if result is None:
            return None
        if not isinstance(result, dict):
            raise APIDirectoryError("the SD's tip is not a record")
        try:
            return records.normalise_signed_record(result)
        except forms.FormError as e:
            raise APIDirectoryError(f"the SD's tip is malformed: {e}") from None

    def submit(self, signed_records: list[dict]) -> Deferred[Any]:
        """Submit signed records to the SD (``submitRecords``); fires with its result."""
        # Only a transport failure moves on to the next endpoint: a refusal is an answer.
        return self._call("submitRecords", {"records": list(signed_records)}, fail_over=False)

    @inlineCallbacks
    def _call(self, method: str, params: dict[str, Any], fail_over: bool,
              check: Callable[[Any], None] | None = None,
              ) -> Generator[Deferred[Any], Any, Any]:
        errors = []
        for url, client in zip(self._endpoints, self._clients):
            try:
                result = yield client.call(method, params)
                if check is not None:
                    check(result)
                return result
            except TransportError as e:
                errors.append(f"{url}: {e}")
            except (JSONRPCError, APIDirectoryError) as e:
                if not fail_over:
                    raise
                errors.append(f"{url}: {e}")
        raise UpdateError(f"no SD endpoint answered {method}: " + "; ".join(errors))

    # -- updating -------------------------------------------------------------------

    def update(self) -> Deferred[bool]:
        """
        Fetch and verify the records after our tip (one update at a time).  Fires with
        whether the entries changed; fails with :class:`UpdateError`, leaving the data
        as it was.
        """
        return self._lock.run(self._update)

    @inlineCallbacks
    def _update(self) -> Generator[Deferred[Any], Any, bool]:
        def must_be_records(result: Any) -> None:
            if isinstance(result, dict):
                result = result.get("records")
            if not isinstance(result, list):
                raise APIDirectoryError("getRecords did not return a list of records")

        tip_hash = self._chain.tip_hash
        reply = yield self._call("getRecords", {"after": tip_hash, "checkpoint": True},
                                 fail_over=True, check=must_be_records)
        fetched, served = (reply["records"], reply) if isinstance(reply, dict) else (reply, None)
        try:
            changed = self._apply(fetched, tip_hash, served)
        except ViewRefused as e:
            self._refused.labels(e.kind).inc()
            if self.refusal != e.reason:
                log.error("refused the SD's view of the directory ({kind}): {reason}; "
                          "serving the verified data", kind=e.kind, reason=e.reason)
            self.refusal = e.reason
            raise UpdateError(f"refused the SD's view: {e.reason}") from None
        if self.refusal is not None:
            log.info("the SD's view of the directory is accepted again")
            self.refusal = None
        self.last_success = self._reactor.seconds()
        if self._witness is not None:
            yield self._cosign()
        if changed:
            log.info("directory updated: {count} records, tip {tip}",
                     count=len(self._chain), tip=self._chain.tip_hash[:16])
            self._write_cache()
            self._notify()
        return changed

    def _apply(self, fetched: list[Any], tip_hash: str, served: Any) -> bool:
        """
        Check the view (the records after ``tip_hash`` and the checkpoint ``served``
        with them) and, if it may replace ours, take it.  Returns whether the chain
        changed; raises :class:`ViewRefused` or :class:`UpdateError`, changing nothing.
        """
        chain = self._chain
        first = fetched[0] if fetched else None
        parent = first.get("parent_hash") if isinstance(first, dict) else None
        try:
            if not fetched or parent == tip_hash:
                view = self._extension_view(chain, fetched)
                verified = self.guard.check(view, served)
                chain.extend(fetched)
                self.guard.accept(verified)
                return bool(fetched) or self._new_checkpoint(verified)
            if parent == "":
                fresh = VerifiedChain(self._trust)
                fresh.extend(fetched)
                # A new root is a reset; the same root again is this chain served whole
                # (the SD does not know our tip: a rollback or a fork, or a new SD).
                root = fresh.records[0]
                same_root = bool(chain.records) and chain.records[0]["hash"] == root["hash"]
                view = View(len(fresh), fresh.head_at, fresh.pins.pinned,
                            None if same_root else root)
                verified = self.guard.check(view, served)
                current = chain.root_created_at
                if self.guard.verified is None and current is not None and (
                    created_at_key(fresh.root_created_at or "") < created_at_key(current)
                ):
                    raise UpdateError(
                        "server tried to provide an outdated service directory"
                    )
                if fresh.head_at(len(chain)) != chain.head:
                    log.info("the SD was reset: rebuilding the directory from a new root")
                self.guard.accept(verified)
                self._chain = fresh
                return True
        except ChainError as e:
            raise UpdateError(f"refused records from the SD: {e}") from None
        raise UpdateError("records do not continue the local chain")

    @inlineCallbacks
    def _cosign(self) -> Generator[Deferred[Any], Any, None]:
        """As a witness: cosign the checkpoint just verified, once; failures are logged."""
        verified = self.guard.verified
        assert self._witness is not None
        if verified is None or verified.checkpoint == self._cosigned:
            return
        if any(s.name == self.name for s in verified.signed.signatures):
            self._cosigned = verified.checkpoint
            return
        key, certificate_pem = self._witness
        try:
            note = cp.cosign(verified.signed, self.name, key, certificate_pem)
            yield self._call("submitCosignature",
                             {"checkpoint": note.text, "certificate": certificate_pem},
                             fail_over=True)
        except (cp.CheckpointError, UpdateError) as e:
            log.warn("could not cosign checkpoint {checkpoint}: {error}",
                     checkpoint=short(verified.checkpoint), error=str(e))
            return
        self._cosigned = verified.checkpoint
        log.info("cosigned checkpoint {checkpoint}", checkpoint=short(verified.checkpoint))

    def _new_checkpoint(self, verified: Verified | None) -> bool:
        # Same records, newer signature (or cosignatures): worth writing to the cache.
        return verified is not None and verified.signed.text != self._cached_note

    @staticmethod
    def _extension_view(chain: VerifiedChain, fetched: list[Any]) -> View:
        """The view ``chain`` + ``fetched`` (checked, not applied: extend checks records)."""
        try:
            hashes = [r["hash"] for r in fetched]
            heads = cp.chain_heads(hashes, chain.head)
        except (KeyError, TypeError, cp.CheckpointError):
            raise ViewRefused("mismatch", "the records served have malformed hashes") from None
        pins = chain.pins.copy()
        for signed in fetched:
            pins.observe(signed)
        size = len(chain)

        def head_at(n: int) -> bytes | None:
            if n <= size:
                return chain.head_at(n)
            return heads[n - size - 1] if n - size <= len(heads) else None

        return View(size + len(heads), head_at, pins.pinned)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:
                log.failure("directory listener failed")

    def _check_age(self, _: object = None) -> None:
        since = self.last_success if self.last_success is not None else self._started_at
        if since is None:
            return
        stale = self._reactor.seconds() - since > 2 * self.period
        if stale and not self._stale_warned:
            self._stale_warned = True
            log.warn("directory data is stale: no successful update for {seconds:.0f}s",
                     seconds=self._reactor.seconds() - since)
        elif not stale and self._stale_warned:
            self._stale_warned = False
            log.info("directory data is fresh again")

    # -- cache file -----------------------------------------------------------------

    def _load_cache(self) -> None:
        assert self.cache_file is not None
        path = self.cache_file
        try:
            with path.open("rb") as f:
                data = f.read(MAX_CACHE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warn("cannot read directory cache {path}: {error}", path=str(path),
                     error=e.strerror)
            return
        try:
            if len(data) > MAX_CACHE_BYTES:
                raise APIDirectoryError(f"larger than {MAX_CACHE_BYTES} bytes")
            try:
                content = records.loads(data)
            except ValueError as e:
                raise APIDirectoryError(f"invalid JSON: {e}") from None
            if not isinstance(content, dict) or not isinstance(content.get("records"), list):
                raise APIDirectoryError('expected an object {"records": [...]}')
            chain = VerifiedChain(self._trust)
            try:
                chain.extend(content["records"])
            except ChainError as e:
                raise APIDirectoryError(str(e)) from None
            if content.get("checkpoint") is None and self.guard.mode == "required":
                raise APIDirectoryError("it holds no checkpoint (checkpoints: required)")
            try:
                verified = self.guard.check(
                    View(len(chain), chain.head_at, chain.pins.pinned), content.get("checkpoint"))
            except ViewRefused as e:
                raise APIDirectoryError(f"its checkpoint: {e}") from None
        except APIDirectoryError as e:
            log.warn("ignoring directory cache {path}: {error}", path=str(path), error=str(e))
            return
        self.guard.accept(verified)
        if verified is not None:
            self._cached_note = verified.signed.text
            log.info("directory cache holds checkpoint {checkpoint}",
                     checkpoint=short(verified.checkpoint))
        self._chain = chain
        log.info("directory loaded {count} records from cache", count=len(chain))
        if len(chain):
            self._notify()

    def _write_cache(self) -> None:
        if self.cache_file is None:
            return
        path = self.cache_file
        content: dict[str, Any] = {"records": self._chain.records}
        verified = self.guard.verified
        if verified is not None:
            content["checkpoint"] = verified.as_json()
            self._cached_note = verified.signed.text
        body = json.dumps(content, separators=(",", ":")).encode()
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            log.warn("cannot write directory cache {path}: {error}", path=str(path),
                     error=e.strerror or str(e))
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
