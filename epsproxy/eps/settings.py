"""
The settings schema of an endpoint server's role (SPEC §7, §12, §17).

The ``eps`` command line (``eps sd submit-records``, ``eps sd get-entries``) reads the
same role folders as ``twistd eps``, so the schema lives here, beside the server.
"""

from __future__ import annotations

from .. import forms
from ..jsonrpc import JSONRPC_CLIENT_SETTINGS
from ..metrics import METRICS_SETTINGS
from ..tls import TLS_SETTINGS

__all__ = ["EPS_SETTINGS", "API_DIRECTORY_SETTINGS", "JSON_DIRECTORY_SETTINGS", "SIGNING_SETTINGS"]

SD_CLIENT_SETTINGS = forms.Map(
    {
        "tls": forms.Required(TLS_SETTINGS),
        "timeout": forms.Optional(forms.Float(min=0.1, max=600), default=10.0),
    },
    strict=True,
)

API_DIRECTORY_SETTINGS = forms.Map(
    {
        "endpoints": forms.Required(forms.List(forms.String(min_length=1), min_length=1)),
        "server_names": forms.Optional(forms.StringList(), default=[]),
        "cache_entries_for": forms.Optional(forms.Integer(min=0, max=3600), default=5),
        "jsonrpc_client": forms.Required(SD_CLIENT_SETTINGS),
        "ca_certificate_files": forms.Required(forms.StringList()),
        "ca_intermediate_certificate_files": forms.Optional(forms.StringList(), default=[]),
        "cache_file": forms.Optional(forms.String()),
    },
    strict=True,
)

JSON_DIRECTORY_SETTINGS = forms.Map({"path": forms.Required(forms.String())}, strict=True)


def _directory(value: dict) -> dict:
    kind = value["type"]
    schema = API_DIRECTORY_SETTINGS if kind == "api" else JSON_DIRECTORY_SETTINGS
    value["settings"] = schema.validate(value.get("settings"), ("settings",))
    return value


DIRECTORY_SETTINGS = forms.Check(
    forms.Map(
        {
            "type": forms.Required(forms.String(choices=("api", "json"))),
            "settings": forms.Required(forms.AnyMap()),
        },
        strict=True,
    ),
    _directory,
)

SIGNING_SETTINGS = forms.Map(
    {
        "certificate_file": forms.Required(forms.String()),
        "key_file": forms.Required(forms.String()),
        "ca_certificate_file": forms.Required(forms.String()),
        "ca_intermediate_certificate_files": forms.Optional(forms.StringList(), default=[]),
        "name": forms.Optional(forms.String()),
    },
    strict=True,
)

CHANNEL_SETTINGS = forms.Map(
    {
        "name": forms.Required(forms.String(min_length=1)),
        "type": forms.Required(forms.String(min_length=1)),
        "settings": forms.Optional(forms.AnyMap(), default={}),
    },
    strict=True,
)

EPS_SETTINGS = forms.Map(
    {
        "name": forms.Required(forms.String(min_length=1, max_length=253)),
        "directory": forms.Required(DIRECTORY_SETTINGS),
        "channels": forms.Optional(forms.List(CHANNEL_SETTINGS), default=[]),
        "metrics": forms.Optional(METRICS_SETTINGS),
        "signing": forms.Optional(SIGNING_SETTINGS),
    },
    strict=True,
)

# JSONRPC_CLIENT_SETTINGS is re-exported for channel schemas built on this module.
__all__ += ["JSONRPC_CLIENT_SETTINGS"]
