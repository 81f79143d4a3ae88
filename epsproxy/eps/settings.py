"""
The settings schema of an endpoint server's role (SPEC §7, §12, §17).

The ``eps`` command line (``eps sd submit-records``, ``eps sd get-entries``) reads the
same role folders as ``twistd eps``, so the schema lives here, beside the server.
"""

from __future__ import annotations

from typing import Any

from epsproxy.rules import forms
from epsproxy.rules.credentials import FileSet, tls_file_set
from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS
from epsproxy.net.admission import PROCESS_MAX_CONNECTIONS_SETTING
from epsproxy.net.logs import LOG_LEVEL_SETTING
from epsproxy.net.metrics import METRICS_SETTINGS
from epsproxy.net.tls import TLS_SETTINGS

__all__ = [
    "EPS_SETTINGS",
    "API_DIRECTORY_SETTINGS",
    "JSON_DIRECTORY_SETTINGS",
    "GOSSIP_SETTINGS",
    "SIGNING_SETTINGS",
    "eps_file_sets",
]

SD_CLIENT_SETTINGS = forms.Map(
    {
        "tls": forms.Required(TLS_SETTINGS),
        "timeout": forms.Optional(forms.Float(min=0.1, max=600), default=10.0),
        "proxy_url": forms.Optional(
            forms.String(), doc="HTTP CONNECT proxy to the SD (default: HTTPS_PROXY)"
        ),
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
        "checkpoints": forms.Optional(
            forms.String(choices=("required", "optional")), default="optional",
            doc="required: refuse views without a valid signed checkpoint; optional: "
            "accept unsigned views until the first checkpoint verified (docs/checkpoints.md)",
        ),
        "checkpoint_signers": forms.Optional(
            forms.StringList(), default=[],
            doc="names whose signature makes a checkpoint the SD's (default: server_names)",
        ),
        "witnesses": forms.Optional(forms.Map(
            {
                "names": forms.Required(forms.StringList()),
                "required": forms.Optional(forms.Integer(min=0, max=32), default=1),
                "cosign": forms.Optional(forms.Boolean(), default=False,
                                         doc="cosign the checkpoints this node verified"),
            },
            strict=True,
        )),
    },
    strict=True,
)

GOSSIP_SETTINGS = forms.Map(
    {
        "enabled": forms.Optional(forms.Boolean(), default=True,
                                  doc="gossip checkpoints (api directory only)"),
        "interval": forms.Optional(
            forms.Float(min=0.05, max=86400), default=60.0,
            doc="seconds between two rounds of checkpoint gossip with the linked peers",
        ),
        "evidence_dir": forms.Optional(
            forms.String(min_length=1),
            doc="where evidence of a split view is saved (default: evidence/ beside "
            "the directory's cache_file)",
        ),
    },
    strict=True,
)

JSON_DIRECTORY_SETTINGS = forms.Map(
    {
        "path": forms.Required(forms.String()),
        "reload_interval": forms.Optional(
            forms.Float(min=0, max=3600), default=1.0,
            doc="look for changed record files at most this often (seconds)",
        ),
    },
    strict=True,
)


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

def channel_schemas() -> dict[str, forms.Schema]:
    """Channel type -> schema of its ``settings`` (aliases included; SPEC §12)."""
    from .channels.gateway import GATEWAY_SETTINGS
    from .channels.peer import EPS_CLIENT_SETTINGS, EPS_SERVER_SETTINGS

    local_client = forms.Map(
        {
            **JSONRPC_CLIENT_SETTINGS.fields,
            "services": forms.Optional(
                forms.StringList(), doc="deliver only methods of these own services"
            ),
        },
        strict=True,
    )
    return {
        "eps_server": EPS_SERVER_SETTINGS,
        "grpc_server": EPS_SERVER_SETTINGS,
        "eps_client": EPS_CLIENT_SETTINGS,
        "grpc_client": EPS_CLIENT_SETTINGS,
        "jsonrpc_server": GATEWAY_SETTINGS,
        "jsonrpc_client": local_client,
        "stdout": forms.Map({}, strict=True),
    }


def _channel(value: dict) -> dict:
    schemas = channel_schemas()
    schema = schemas.get(value["type"])
    if schema is None:
        known = ", ".join(sorted(schemas))
        raise forms.FormError(f"unknown channel type (known types: {known})", ("type",))
    value["settings"] = schema.validate(value.get("settings") or {}, ("settings",))
    return value


CHANNEL_SETTINGS = forms.Check(
    forms.Map(
        {
            "name": forms.Required(forms.String(min_length=1)),
            "type": forms.Required(forms.String(min_length=1)),
            "settings": forms.Optional(forms.AnyMap(), default={}),
        },
        strict=True,
    ),
    _channel,
)


def _channels(value: list) -> list:
    """At most one channel per type (aliases count), and unique names."""
    from ..directory.entries import canonical_channel_type

    types: set[str] = set()
    names: set[str] = set()
    for index, channel in enumerate(value):
        kind = canonical_channel_type(channel["type"])
        if kind in types:
            item = forms.Index(index, channel["name"]) if channel["name"] not in names \
                else index
            raise forms.FormError("a second channel of this type", (item, "type"))
        if channel["name"] in names:
            raise forms.FormError("a second channel of this name", (index, "name"))
        types.add(kind)
        names.add(channel["name"])
    return value

EPS_SETTINGS = forms.Map(
    {
        "name": forms.Required(forms.String(min_length=1, max_length=253)),
        "directory": forms.Required(DIRECTORY_SETTINGS),
        "channels": forms.Optional(
            forms.Check(forms.List(CHANNEL_SETTINGS, name_key="name"), _channels), default=[]
        ),
        "metrics": forms.Optional(METRICS_SETTINGS),
        "signing": forms.Optional(SIGNING_SETTINGS),
        "gossip": forms.Optional(GOSSIP_SETTINGS, doc="checkpoint gossip (docs/checkpoints.md)"),
        "log_level": LOG_LEVEL_SETTING,
        "max_connections": PROCESS_MAX_CONNECTIONS_SETTING,
    },
    strict=True,
)

#: Channel types whose certificate is the operator's identity towards other endpoint
#: servers (peers match its names against the directory).
_PEER_CHANNELS = ("eps_server", "grpc_server", "eps_client", "grpc_client")


def _channel_label(index: int, channel: dict[str, Any]) -> str:
    return forms.format_path(
        ("channels", forms.Index(index, channel["name"])
         if forms.element_label(channel, "name") else index)
    )


def eps_file_sets(settings: dict[str, Any]) -> list[FileSet]:
    """
    The credential files of validated endpoint-server settings: every channel's ``tls``
    block (the peer channels' certificates must name the operator ``name``), the
    directory client's block and the roots of signed records (``type: api``), and the
    signing block (its certificate must carry ``iris-name://`` of ``signing.name`` or,
    without one, of ``name``).
    """
    name = settings["name"]
    sets: list[FileSet] = []
    directory = settings["directory"]
    if directory["type"] == "api":
        api = directory["settings"]
        sets.append(tls_file_set(
            "directory.settings.jsonrpc_client.tls", api["jsonrpc_client"]["tls"]
        ))
        sets.append(FileSet(
            where="directory.settings", certificate_file=None, key_file=None,
            ca_files=tuple(api["ca_certificate_files"]),
            intermediate_files=tuple(api["ca_intermediate_certificate_files"]),
            kind="signing",
        ))
    for index, channel in enumerate(settings["channels"]):
        tls = channel["settings"].get("tls")
        if tls is None:
            continue
        operator = name if channel["type"] in _PEER_CHANNELS else None
        where = f"{_channel_label(index, channel)}.settings.tls"
        sets.append(tls_file_set(where, tls, operator))
    signing = settings.get("signing")
    if signing is not None:
        sets.append(FileSet(
            where="signing",
            certificate_file=signing["certificate_file"],
            key_file=signing["key_file"],
            ca_files=(signing["ca_certificate_file"],),
            intermediate_files=tuple(signing["ca_intermediate_certificate_files"]),
            operator=signing.get("name") or name,
            kind="signing",
            ca_key="ca_certificate_file",
        ))
    return sets

# JSONRPC_CLIENT_SETTINGS is re-exported for channel schemas built on this module.
__all__ += ["JSONRPC_CLIENT_SETTINGS"]
