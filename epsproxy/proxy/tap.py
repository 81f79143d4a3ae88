"""``twistd proxy``: options and service construction for the proxies."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.python import usage

from epsproxy.net import tls
from epsproxy.net.metrics import metrics_service
from epsproxy.net.reactor import IReactor, installed_reactor
from epsproxy.rules.settings import SettingsError, load_settings, settings_paths
from .private.service import PrivateProxyService
from .public import PublicProxyService
from .settings import PROXY_SETTINGS

__all__ = ["MODES", "Options", "makeService"]

MODES = ("public", "private")


class Options(usage.Options):
    """Command line of ``twistd proxy``."""

    synopsis = "--mode public|private [--settings DIR[:DIR...]]"
    longdesc = (
        "Run a proxy. --mode public brokers peer-to-peer connections between endpoint "
        "servers that cannot reach each other: its endpoint server forwards "
        "requestConnection calls to it, and the two parties meet at its internal endpoint "
        "with a one-time token and are spliced (TLS end to end; the proxy never sees "
        "plaintext). --mode private receives TLS connections for announced domains "
        "through a public proxy and relays them to an internal server (raw, or "
        "terminating TLS and forwarding HTTP). Settings are the *.yml files "
        "of the folders given by --settings or PROXY_SETTINGS, e.g. "
        "PROXY_SETTINGS=conf/dev/roles/public-proxy-1; each mode needs the section "
        "of its name ('public' or 'private')."
    )
    optParameters = [
        ["mode", "m", None, "public or private (required)."],
        ["settings", "s", None,
         "Colon-separated settings folders or files (default: $PROXY_SETTINGS)."],
    ]

    def postOptions(self) -> None:
        mode = self["mode"]
        if mode is None:
            raise usage.UsageError("--mode is required: public or private")
        if mode not in MODES:
            raise usage.UsageError(f"--mode must be public or private, not {mode!r}")
        try:
            paths = settings_paths(self["settings"], "PROXY_SETTINGS")
            self.settings: dict[str, Any] = load_settings(paths, PROXY_SETTINGS)
        except SettingsError as e:
            raise usage.UsageError(str(e)) from None
        public = self.settings.get(mode)
        if public is None:
            where = ":".join(str(p) for p in paths)
            raise usage.UsageError(f"{where}: no '{mode}' section (needed by --mode {mode})")
        if mode == "public":
            _check_tls(public)
        else:
            _check_private_tls(public)


def _check_tls(public: dict[str, Any]) -> None:
    """Load the TLS files now, so that a wrong path is one usage error, not a failed start."""
    server_tls = public["jsonrpc_server"].get("tls")
    if server_tls is not None:
        try:
            tls.server_options(server_tls)
        except tls.TLSSettingsError as e:
            raise usage.UsageError(f"public.jsonrpc_server.{e}") from None
    client = public["jsonrpc_client"]
    if client.get("tls") is not None and client["endpoint"].startswith("https:"):
        name = client.get("server_name") or client["tls"].get("server_name") or "localhost"
        try:
            tls.client_options(client["tls"], name)
        except tls.TLSSettingsError as e:
            raise usage.UsageError(f"public.jsonrpc_client.{e}") from None


def _check_private_tls(private: dict[str, Any]) -> None:
    """The private section's TLS files, loaded now (one usage error, not a failed start)."""
    checks: list[tuple[str, Any]] = []
    server_tls = private["jsonrpc_server"].get("tls")
    if server_tls is not None:
        checks.append(("private.jsonrpc_server.", lambda: tls.server_options(server_tls)))
    endpoint_tls = private["internal_endpoint"].get("tls")
    if endpoint_tls is not None:
        checks.append(("private.internal_endpoint.",
                       lambda: tls.server_options(endpoint_tls)))
    for where, client in (
        ("private.jsonrpc_client.", private["jsonrpc_client"]),
        ("private.internal_endpoint.jsonrpc_client.",
         private["internal_endpoint"].get("jsonrpc_client")),
    ):
        if client is not None and client.get("tls") is not None and \
                client["endpoint"].startswith("https:"):
            name = client.get("server_name") or client["tls"].get("server_name") or "localhost"
            checks.append((where, lambda c=client, n=name: tls.client_options(c["tls"], n)))
    for where, check in checks:
        try:
            check()
        except tls.TLSSettingsError as e:
            raise usage.UsageError(f"{where}{e}") from None


def makeService(
    options: Options, reactor: IReactor | None = None, *, exit_on_failure: bool = True
) -> MultiService:
    """
    The proxy's service tree: the public or private proxy (by ``--mode``) and, if
    configured, metrics.  With
    ``exit_on_failure`` (what twistd wants) a failed start-up stops the reactor.
    """
    if reactor is None:
        reactor = installed_reactor()  # twistd installs it first
    top = MultiService()
    registry = CollectorRegistry()
    if options["mode"] == "private":
        PrivateProxyService(
            reactor, options.settings["private"], registry,
            stop_reactor_on_failure=exit_on_failure,
        ).setServiceParent(top)
    else:
        PublicProxyService(
            reactor, options.settings["public"], registry,
            stop_reactor_on_failure=exit_on_failure,
        ).setServiceParent(top)
    if options.settings.get("metrics"):
        metrics_service(reactor, options.settings["metrics"], registry).setServiceParent(top)
    return top
