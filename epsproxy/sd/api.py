"""
The SD's JSON-RPC methods (SPEC §8.4).

``getRecords`` takes ``after`` (the reference's name) or ``since`` (the name its
documentation uses).  ``tip`` is accepted as an alias of ``getTip``.  Append failures get
specific codes instead of the reference's blanket ``-32603``: 409 stale append (``data.tip``
names the current tip), 403 signer not allowed, 400 invalid record, and -32603 with a
message saying so when the datastore cannot be reached (the store's own error, which names
its address, goes to the log only).
"""

from __future__ import annotations

from typing import NoReturn

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from epsproxy.rules import forms
from epsproxy.net.jsonrpc.envelope import INTERNAL_ERROR, CallContext, Dispatcher, JSONRPCError
from epsproxy.rules.records import SIGNED_RECORD
from ..store import StoreError
from .checkpoints import CosignatureRefused
from .directory import INVALID, ServiceDirectory, SubmitError

__all__ = ["sd_dispatcher", "MAX_RECORDS_PER_SUBMIT", "STORE_UNAVAILABLE"]

log = Logger()

#: What a submitter is told when the datastore failed (it may be retried).
STORE_UNAVAILABLE = (
    "the service directory's datastore is unavailable; the records were not acknowledged, "
    "try again later"
)

MAX_RECORDS_PER_SUBMIT = 10_000

HASH_OR_EMPTY = forms.String(pattern=r"[a-f0-9]{64}|")

SUBMIT_PARAMS = forms.Map(
    {
        "records": forms.Required(
            forms.List(SIGNED_RECORD, min_length=1, max_length=MAX_RECORDS_PER_SUBMIT)
        )
    }
)
GET_RECORDS_PARAMS = forms.Map(
    {
        "after": forms.Optional(HASH_OR_EMPTY),
        "since": forms.Optional(HASH_OR_EMPTY),
        # Ours, not the reference's: ask for {"records", "checkpoint", "certificates"}
        # instead of the bare list (a reference client never sends it).
        "checkpoint": forms.Optional(forms.Boolean(), default=False),
    }
)
COSIGNATURE_PARAMS = forms.Map(
    {
        "checkpoint": forms.Required(forms.String(min_length=1, max_length=16384)),
        "certificate": forms.Required(forms.String(min_length=1, max_length=65536)),
    }
)
NO_PARAMS = forms.Map({})
GET_ENTRY_PARAMS = forms.Map({"name": forms.Required(forms.String(min_length=1, max_length=253))})


def sd_dispatcher(directory: ServiceDirectory) -> Dispatcher:
    """The methods of the SD's JSON-RPC server, bound to ``directory``."""
    dispatcher = Dispatcher()

    def submit_records(params: dict, context: CallContext) -> Deferred[str]:
        def failed(failure: Failure) -> NoReturn:
            failure.trap(SubmitError, StoreError)
            error = failure.value
            if isinstance(error, SubmitError):
                raise JSONRPCError(error.code, error.message, error.data)
            log.warn("submitRecords failed: {error}", error=str(error))
            raise JSONRPCError(INTERNAL_ERROR, STORE_UNAVAILABLE)

        return directory.submit(params["records"]).addCallbacks(lambda _: "ok", failed)

    def get_tip(params: dict, context: CallContext) -> dict | None:
        return directory.tip()

    def get_records(params: dict, context: CallContext) -> list[dict] | dict:
        after = params.get("after") or params.get("since") or ""
        if params.get("checkpoint"):
            return directory.records_with_checkpoint(after)
        return directory.records_after(after)

    def get_checkpoint(params: dict, context: CallContext) -> dict:
        served = directory.checkpoint()
        if served is None:
            raise JSONRPCError(404, "this service directory signs no checkpoints")
        return served

    def submit_cosignature(params: dict, context: CallContext) -> dict:
        signer = directory.checkpoints
        if signer is None:
            raise JSONRPCError(404, "this service directory signs no checkpoints")
        try:
            witnesses = signer.add_cosignature(
                directory.record_log.selected, params["checkpoint"], params["certificate"],
                directory.trust)
        except CosignatureRefused as e:
            raise JSONRPCError(INVALID, f"cosignature refused: {e}") from None
        return {"witnesses": witnesses}

    def get_entries(params: dict, context: CallContext) -> list[dict]:
        return directory.entries()

    def get_entry(params: dict, context: CallContext) -> dict:
        entry = directory.entry(params["name"])
        if entry is None:
            raise JSONRPCError(404, "not found")
        return entry

    dispatcher.register("submitRecords", SUBMIT_PARAMS, submit_records)
    dispatcher.register("getTip", NO_PARAMS, get_tip)
    dispatcher.register("tip", NO_PARAMS, get_tip)
    dispatcher.register("getRecords", GET_RECORDS_PARAMS, get_records)
    dispatcher.register("getCheckpoint", NO_PARAMS, get_checkpoint)
    dispatcher.register("submitCosignature", COSIGNATURE_PARAMS, submit_cosignature)
    dispatcher.register("getEntries", NO_PARAMS, get_entries)
    dispatcher.register("getEntry", GET_ENTRY_PARAMS, get_entry)
    return dispatcher
