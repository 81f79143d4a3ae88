"""The real ``twistd`` of this virtualenv, run as a subprocess whose output a test watches."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

TWISTD = str(Path(sys.executable).parent / "twistd")


class TwistdProcess(ProcessProtocol):
    """A twistd process whose output is watched for a line matching ``pattern``."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)
        self.output = b""
        self.matched: Deferred[re.Match] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = self.pattern.search(self.output.decode("utf-8", "replace"))
        if match and not self.matched.called:
            self.matched.callback(match)

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        if not self.matched.called:
            self.matched.errback(RuntimeError(self.output.decode("utf-8", "replace")))
        self.ended.callback(reason.value.exitCode)
