"""The settings schema of ``twistd sd`` (SPEC §8.1, plus metrics, which the reference ignores)."""

from __future__ import annotations

from epsproxy.rules import forms
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS
from epsproxy.net.metrics import METRICS_SETTINGS
from ..store import DATASTORE_SETTINGS

__all__ = ["SD_SETTINGS"]

SD_DIRECTORY_SETTINGS = forms.Map(
    {
        "datastore": forms.Required(
            DATASTORE_SETTINGS, doc="where the signed change records are kept"
        ),
        "ca_certificate_files": forms.Required(
            forms.StringList(), doc="roots that signing certificates must chain to"
        ),
        "ca_intermediate_certificate_files": forms.Optional(forms.StringList(), default=[]),
        "refresh_interval": forms.Optional(
            forms.Float(min=0.1, max=3600),
            default=5.0,
            doc="seconds between reads of records that other SD instances appended",
        ),
    },
    strict=True,
)

SD_SETTINGS = forms.Map(
    {
        "jsonrpc_server": forms.Required(JSONRPC_SERVER_SETTINGS),
        "directory": forms.Required(SD_DIRECTORY_SETTINGS),
        "metrics": forms.Optional(METRICS_SETTINGS),
    },
    strict=True,
)
