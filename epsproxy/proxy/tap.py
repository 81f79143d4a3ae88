"""``twistd proxy``: options and service construction for the proxies."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.python import usage

from epsproxy.rules.credentials import FileSet
from epsproxy.rules.settings import SettingsError
from epsproxy.net.lifecycle import AsyncStartService
from epsproxy.net.metrics import metrics_service
from epsproxy.proxy.status_page import PrivateProxyPage, PublicProxyPage
from epsproxy.net.program import ProgramOptions, ProgramService
from epsproxy.net.reactor import IReactor, installed_reactor
from .private.service import PrivateProxyService
from .public import PublicProxyService
from .settings import PROXY_SETTINGS, proxy_file_sets

__all__ = ["MODES", "Options", "makeService"]

MODES = ("public", "private")


class Options(ProgramOptions):
    """Command line of ``twistd proxy``."""

    synopsis = (
        "--mode public|private [--settings DIR[:DIR...]] [--check] [--log-level LEVEL] "
        "[--log-format text|json]"
    )
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
        "of its name ('public' or 'private'). See docs/operating.md for --check, exit "
        "status, logs and signals."
    )
    optParameters = [
        ["mode", "m", None, "public or private (required)."],
        ["settings", "s", None,
         "Colon-separated settings folders or files (default: $PROXY_SETTINGS)."],
    ]
    env_var = "PROXY_SETTINGS"
    schema = PROXY_SETTINGS

    def check_command_line(self) -> None:
        mode = self["mode"]
        if mode is None:
            raise usage.UsageError("--mode is required: public or private")
        if mode not in MODES:
            raise usage.UsageError(f"--mode must be public or private, not {mode!r}")

    def check_settings(self, settings: dict[str, Any]) -> None:
        mode = self["mode"]
        if settings.get(mode) is None:
            where = ":".join(str(p) for p in self.paths)
            raise SettingsError(f"no '{mode}' section (needed by --mode {mode})", file=where)

    def file_sets(self, settings: dict[str, Any]) -> list[FileSet]:
        return proxy_file_sets(settings, self["mode"])

    def service_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        section: dict[str, Any] = settings[self["mode"]]
        return section


def makeService(
    options: Options, reactor: IReactor | None = None, *, exit_on_failure: bool = True
) -> MultiService:
    """
    The proxy's service tree: the public or private proxy (by ``--mode``) and, if
    configured, metrics.  With ``exit_on_failure`` (what twistd wants) a failed start-up
    stops the reactor and the process exits 1, and the process handles signals
    (:mod:`epsproxy.net.program`).
    """
    if reactor is None:
        reactor = installed_reactor()  # twistd installs it first
    registry = CollectorRegistry()
    top = ProgramService(reactor, options, "proxy", registry, manage_process=exit_on_failure)
    proxy: AsyncStartService[Any]
    if options["mode"] == "private":
        proxy = PrivateProxyService(
            reactor, options.settings["private"], registry,
            stop_reactor_on_failure=exit_on_failure,
        )
    else:
        proxy = PublicProxyService(
            reactor, options.settings["public"], registry,
            stop_reactor_on_failure=exit_on_failure,
        )
    top.add_main(proxy)
    if options.settings.get("metrics"):
        page = (PrivateProxyPage if options["mode"] == "private" else PublicProxyPage)(
            proxy, reactor)
        top.add_listener(
            metrics_service(reactor, options.settings["metrics"], registry,
                            program="proxy", readiness=proxy.readiness, page=page),
            "metrics listener",
        )
    return top
