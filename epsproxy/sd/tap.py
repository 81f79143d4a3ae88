"""``twistd sd``: options and service construction for the service directory."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.python import usage

from epsproxy.rules.certificates import CertificateError
from epsproxy.net.metrics import metrics_service
from epsproxy.net.reactor import IReactor, installed_reactor
from epsproxy.rules.records import TrustStore
from epsproxy.rules.settings import SettingsError, load_settings, settings_paths
from .service import ServiceDirectoryService
from .settings import SD_SETTINGS

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    """Command line of ``twistd sd``."""

    synopsis = "[--settings DIR[:DIR...]]"
    longdesc = (
        "Serve the signed service directory: a JSON-RPC 2.0 API over mutual TLS "
        "(getRecords, getTip, getEntries, getEntry, submitRecords) on a hash-chained log "
        "of ECDSA-signed change records. Settings are the *.yml files of the folders given "
        "by --settings or SD_SETTINGS, e.g. SD_SETTINGS=conf/dev/roles/sd-1."
    )
    optParameters = [
        ["settings", "s", None,
         "Colon-separated settings folders or files (default: $SD_SETTINGS)."],
    ]

    def postOptions(self) -> None:
        try:
            paths = settings_paths(self["settings"], "SD_SETTINGS")
            self.settings: dict[str, Any] = load_settings(paths, SD_SETTINGS)
        except SettingsError as e:
            raise usage.UsageError(str(e)) from None
        directory = self.settings["directory"]
        try:
            self.trust = TrustStore.from_files(
                directory["ca_certificate_files"],
                directory["ca_intermediate_certificate_files"],
            )
        except CertificateError as e:
            raise usage.UsageError(f"directory.ca_certificate_files: {e}") from None


def makeService(
    options: Options, reactor: IReactor | None = None, *, exit_on_failure: bool = True
) -> MultiService:
    """
    The SD service tree: the directory service and, if configured, metrics.  With
    ``exit_on_failure`` (what twistd wants) a failed start-up stops the reactor.
    """
    if reactor is None:
        reactor = installed_reactor()  # taken late: twistd installs it first
    top = MultiService()
    registry = CollectorRegistry()
    ServiceDirectoryService(
        reactor, options.settings, options.trust, registry,
        stop_reactor_on_failure=exit_on_failure,
    ).setServiceParent(top)
    if options.settings.get("metrics"):
        metrics_service(reactor, options.settings["metrics"], registry).setServiceParent(top)
    return top
