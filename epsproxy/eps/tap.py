"""``twistd eps``: options and service construction for the endpoint server."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService

from epsproxy.rules.credentials import FileSet
from epsproxy.eps.status_page import EndpointServerPage
from epsproxy.net.metrics import metrics_service
from epsproxy.net.program import ProgramOptions, ProgramService
from epsproxy.net.reactor import IReactor, installed_reactor
from .service import EndpointServerService
from .settings import EPS_SETTINGS, eps_file_sets

__all__ = ["Options", "makeService"]


class Options(ProgramOptions):
    """Command line of ``twistd eps``."""

    synopsis = "[--settings DIR[:DIR...]] [--check] [--log-level LEVEL] [--log-format text|json]"
    longdesc = (
        "Run an operator's endpoint server: a JSON-RPC gateway for the operator's own "
        "applications (\"hd-2._ping\" calls _ping on operator hd-2), mutual-TLS links to "
        "other endpoint servers (directly or brokered by a proxy), permission checks "
        "against the signed service directory, and delivery to the operator's local "
        "services. Settings are the *.yml files of the folders given by --settings or "
        "EPS_SETTINGS, e.g. EPS_SETTINGS=conf/dev/roles/hd-1 (see docs/settings.md, and "
        "docs/operating.md for --check, exit status, logs and signals)."
    )
    optParameters = [
        ["settings", "s", None,
         "Colon-separated settings folders or files (default: $EPS_SETTINGS)."],
    ]
    env_var = "EPS_SETTINGS"
    schema = EPS_SETTINGS

    def file_sets(self, settings: dict[str, Any]) -> list[FileSet]:
        return eps_file_sets(settings)


def makeService(
    options: Options, reactor: IReactor | None = None, *, exit_on_failure: bool = True
) -> MultiService:
    """
    The EPS service tree: the endpoint server and, if configured, metrics.  With
    ``exit_on_failure`` (what twistd wants) a failed start-up stops the reactor and the
    process exits 1, and the process handles signals (:mod:`epsproxy.net.program`).
    """
    if reactor is None:
        reactor = installed_reactor()  # taken late: twistd installs it first
    registry = CollectorRegistry()
    top = ProgramService(reactor, options, "eps", registry, manage_process=exit_on_failure)
    eps = EndpointServerService(
        reactor, options.settings, registry, stop_reactor_on_failure=exit_on_failure,
    )
    top.add_main(eps)
    if options.settings.get("metrics"):
        top.add_listener(
            metrics_service(reactor, options.settings["metrics"], registry,
                            program="eps", readiness=eps.readiness,
                            page=EndpointServerPage(eps, reactor, registry)),
            "metrics listener",
        )
    return top
