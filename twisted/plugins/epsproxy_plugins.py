"""The twistd plugins of epsproxy: ``twistd sd``, ``twistd eps`` and ``twistd proxy``."""

from twisted.application.service import ServiceMaker

sd = ServiceMaker(
    "epsproxy service directory",
    "epsproxy.sd.tap",
    "The signed service directory: a JSON-RPC API over a hash-chained log of signed change records.",
    "sd",
)
