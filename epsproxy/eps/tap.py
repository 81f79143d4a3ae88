"""``twistd eps``: options and service construction for the endpoint server."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.python import usage

from epsproxy.net.metrics import metrics_service
from epsproxy.net.reactor import IReactor, installed_reactor
from epsproxy.rules.settings import SettingsError, load_settings, settings_paths
from .service import EndpointServerService
from .settings import EPS_SETTINGS

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Command line of ``twistd eps``."""

    synopsis = "[--settings DIR[:DIR...]]"
    longdesc = (
        "Run an operator's endpoint server: a JSON-RPC gateway for the operator's own "
        "applications (\"hd-2._ping\" calls _ping on operator hd-2), mutual-TLS links to "
        "other endpoint servers (directly or brokered by a proxy), permission checks "
        "against the signed service directory, and delivery to the operator's local "
        "services. Settings are the *.yml files of the folders given by --settings or "
        "EPS_SETTINGS, e.g. EPS_SETTINGS=conf/dev/roles/hd-1 (see docs/settings.md)."
    )
    optParameters = [
        ["settings", "s", None,
         "Colon-separated settings folders or files (default: $EPS_SETTINGS)."],
    ]

    def postOptions(self) -> None:
        try:
            paths = settings_paths(self["settings"], "EPS_SETTINGS")
            self.settings: dict[str, Any] = load_settings(paths, EPS_SETTINGS)
        except SettingsError as e:
            raise usage.UsageError(str(e)) from None


def makeService(
    options: Options, reactor: IReactor | None = None, *, exit_on_failure: bool = True
) -> MultiService:
    """
    The EPS service tree: the endpoint server and, if configured, metrics.  With
    ``exit_on_failure`` (what twistd wants) a failed start-up stops the reactor.
    """
    if reactor is None:
        reactor = installed_reactor()  # taken late: twistd installs it first
    top = MultiService()
    registry = CollectorRegistry()
    EndpointServerService(
        reactor, options.settings, registry, stop_reactor_on_failure=exit_on_failure,
    ).setServiceParent(top)
    if options.settings.get("metrics"):
        metrics_service(reactor, options.settings["metrics"], registry).setServiceParent(top)
    return top
