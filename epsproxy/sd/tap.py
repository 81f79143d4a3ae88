"""``twistd sd``: options and service construction for the service directory."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService

from epsproxy.rules.certificates import CertificateError
from epsproxy.rules.credentials import FileSet
from epsproxy.net.metrics import metrics_service
from epsproxy.sd.browser import DirectoryBrowser
from epsproxy.net.program import ProgramOptions, ProgramService
from epsproxy.net.reactor import IReactor, installed_reactor
from epsproxy.rules.records import TrustStore
from .service import ServiceDirectoryService
from .settings import SD_SETTINGS, sd_file_sets

__all__ = ["Options", "makeService"]


class Options(ProgramOptions):
    """Command line of ``twistd sd``."""

    synopsis = "[--settings DIR[:DIR...]] [--check] [--log-level LEVEL] [--log-format text|json]"
    longdesc = (
        "Serve the signed service directory: a JSON-RPC 2.0 API over mutual TLS "
        "(getRecords, getTip, getEntries, getEntry, submitRecords) on a hash-chained log "
        "of ECDSA-signed change records. Settings are the *.yml files of the folders given "
        "by --settings or SD_SETTINGS, e.g. SD_SETTINGS=conf/dev/roles/sd-1 (see "
        "docs/operating.md for --check, exit status, logs and signals)."
    )
    optParameters = [
        ["settings", "s", None,
         "Colon-separated settings folders or files (default: $SD_SETTINGS)."],
    ]
    env_var = "SD_SETTINGS"
    schema = SD_SETTINGS

    def file_sets(self, settings: dict[str, Any]) -> list[FileSet]:
        return sd_file_sets(settings)

    def postOptions(self) -> None:
        super().postOptions()
        directory = self.settings["directory"]
        try:
            self.trust = TrustStore.from_files(
                directory["ca_certificate_files"],
                directory["ca_intermediate_certificate_files"],
            )
        except CertificateError as e:  # checked above: only if a file changed meanwhile
            raise SystemExit(f"directory.ca_certificate_files: {e}") from None


def makeService(
    options: Options, reactor: IReactor | None = None, *, exit_on_failure: bool = True
) -> MultiService:
    """
    The SD service tree: the directory service and, if configured, metrics.  With
    ``exit_on_failure`` (what twistd wants) a failed start-up stops the reactor and the
    process exits 1, and the process handles signals (:mod:`epsproxy.net.program`).
    """
    if reactor is None:
        reactor = installed_reactor()  # taken late: twistd installs it first
    registry = CollectorRegistry()
    top = ProgramService(reactor, options, "sd", registry, manage_process=exit_on_failure)
    sd = ServiceDirectoryService(
        reactor, options.settings, options.trust, registry,
        stop_reactor_on_failure=exit_on_failure,
    )
    top.add_main(sd)
    if options.settings.get("metrics"):
        top.add_listener(
            metrics_service(reactor, options.settings["metrics"], registry,
                            program="sd", readiness=sd.readiness,
                            page=DirectoryBrowser(sd, reactor)),
            "metrics listener",
        )
    return top
