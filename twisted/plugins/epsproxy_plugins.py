"""
The twistd plugins of epsproxy: ``twistd sd``, ``twistd eps`` and ``twistd proxy``, and
the reactor they run on (``twistd --reactor epsproxy``, the default for these programs).
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

sd = ServiceMaker(
    "epsproxy service directory",
    "epsproxy.sd.tap",
    "The signed service directory: a JSON-RPC API over a hash-chained log of signed change records.",
    "sd",
)

eps = ServiceMaker(
    "epsproxy endpoint server",
    "epsproxy.eps.tap",
    "An operator's endpoint server: JSON-RPC gateway, mutual-TLS links to other endpoint "
    "servers, permission checks against the service directory.",
    "eps",
)

proxy = ServiceMaker(
    "epsproxy proxy",
    "epsproxy.proxy.tap",
    "A proxy: --mode public brokers peer-to-peer connections between endpoint servers "
    "and splices them by one-time token, never seeing plaintext; --mode private relays "
    "TLS connections for announced domains to an internal server.",
    "proxy",
)

epsproxy_reactor = Reactor(
    "epsproxy",
    "epsproxy.net.reactor",
    "epoll, dispatching events without a legacy log context each (the default of "
    "epsproxy's programs).",
)
