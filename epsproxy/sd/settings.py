"""The settings schema of ``twistd sd`` (SPEC §8.1, plus metrics, which the reference ignores)."""

from __future__ import annotations

from typing import Any

from epsproxy.rules import forms
from epsproxy.rules.credentials import FileSet, tls_file_set
from epsproxy.net.jsonrpc.server import JSONRPC_SERVER_SETTINGS
from epsproxy.net.admission import PROCESS_MAX_CONNECTIONS_SETTING
from epsproxy.net.logs import LOG_LEVEL_SETTING
from epsproxy.net.metrics import METRICS_SETTINGS
from ..store import DATASTORE_SETTINGS
from .checkpoints import CHECKPOINT_SETTINGS

__all__ = ["SD_SETTINGS", "sd_file_sets"]

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
        "checkpoint": forms.Optional(
            CHECKPOINT_SETTINGS, doc="the key that signs checkpoints (docs/checkpoints.md)"
        ),
        "log_level": LOG_LEVEL_SETTING,
        "max_connections": PROCESS_MAX_CONNECTIONS_SETTING,
    },
    strict=True,
)


def sd_file_sets(settings: dict[str, Any]) -> list[FileSet]:
    """
    The credential files of validated SD settings: the server's ``tls`` block, the
    roots that verify signing certificates, and the checkpoint key (its certificate
    must name ``checkpoint.name`` and chain to the directory's roots).
    """
    sets = []
    server_tls = settings["jsonrpc_server"].get("tls")
    if server_tls is not None:
        sets.append(tls_file_set("jsonrpc_server.tls", server_tls))
    directory = settings["directory"]
    sets.append(FileSet(
        where="directory", certificate_file=None, key_file=None,
        ca_files=tuple(directory["ca_certificate_files"]),
        intermediate_files=tuple(directory["ca_intermediate_certificate_files"]),
        kind="signing",
    ))
    checkpoint = settings.get("checkpoint")
    if checkpoint is not None:
        sets.append(FileSet(
            where="checkpoint", certificate_file=checkpoint["certificate_file"],
            key_file=checkpoint["key_file"],
            ca_files=tuple(directory["ca_certificate_files"]),
            intermediate_files=tuple(directory["ca_intermediate_certificate_files"]),
            operator=checkpoint["name"], kind="signing",
            ca_key="directory.ca_certificate_files",
            intermediate_key="directory.ca_intermediate_certificate_files",
        ))
    return sets
