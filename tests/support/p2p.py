"""
A small network brokering hd-1 <-> hd-2 through a real public proxy on loopback (the
network of the peer-to-peer tests, SPEC §15): the proxy, its endpoint server
``public-proxy-1.ga``, and hd-1 and hd-2 published behind it, each keeping a link to
the proxy's endpoint server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor

from epsproxy.net.jsonrpc.client import JSONRPC_CLIENT_SETTINGS, JSONRPCClient
from epsproxy.proxy.tap import Options, makeService
from tests.support.eps import (
    Network,
    client_channel,
    gateway_channel,
    gateway_client,
    local_channel,
    server_channel,
    service,
)
from tests.support.proxies import public_section, write_settings
from tests.support.tls import tls_block

PROXY = "public-proxy-1.ga"
HD = ("health-departments",)

#: What hd-1 and hd-2 offer: a ping to health departments, connection requests to proxies.
HD_SERVICES = [
    service("internals", HD, "_ping"),
    service("connection-requests", ("proxy-providers",), "_connectionRequest"),
]

#: hd-1's and hd-2's directory channels: a server reached only through the proxy.
HD_DIRECTORY_CHANNELS = (
    {"type": "eps_server", "settings": {"address": "127.0.0.1:1", "proxy": PROXY}},
    {"type": "eps_client"},
)


@dataclass
class P2PNetwork:
    """The running network: nodes by name in ``net``, the public proxy service, clients."""

    net: Network
    proxy: Any
    proxy_ports: Any
    hd1: JSONRPCClient
    hd2: JSONRPCClient


@defer.inlineCallbacks
def start_public_proxy(test: Any, folder: Path) -> Any:
    """
    The public proxy of :data:`PROXY`, built as twistd builds it from settings written to
    ``folder`` (cleaned up with ``test``), its internal endpoint told its real port;
    fires with ``(service, ports)``.
    """
    options = Options()
    options.parseOptions(["--mode", "public", "--settings", str(write_settings(
        folder, {"public": public_section(folder, 1)}))])
    top = makeService(options, reactor, exit_on_failure=False)
    proxy = top.services[0]
    top.startService()
    test.addCleanup(top.stopService)
    ports = yield proxy.when_ready()
    proxy.proxy.internal_endpoint = f"127.0.0.1:{ports.internal.getHost().port}"
    return proxy, ports


def proxy_channels(ports: Any) -> list[dict[str, Any]]:
    """The channels of the proxy operator's endpoint server (a local one to the proxy)."""
    return [
        server_channel(PROXY), client_channel(PROXY), gateway_channel(PROXY),
        local_channel(f"https://127.0.0.1:{ports.jsonrpc.getHost().port}/jsonrpc",
                      tls=tls_block(PROXY), server_name=PROXY),
    ]


@defer.inlineCallbacks
def answer_through(test: Any, proxy: Any, gateway_url: str) -> Any:
    """Make ``proxy`` call its operator's endpoint server at ``gateway_url``."""
    yield proxy.proxy.client.close()
    proxy.proxy.client = JSONRPCClient(reactor, JSONRPC_CLIENT_SETTINGS.validate({
        "endpoint": gateway_url, "server_name": PROXY, "timeout": 5,
        "tls": tls_block(PROXY)}))
    test.addCleanup(proxy.proxy.client.close)


def hd_channels(name: str, tls: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """hd-1's or hd-2's channels: its server, a client keeping links, its gateway."""
    own = {} if tls is None else {"tls": tls}
    return [
        server_channel(name, **own),
        client_channel(name, reconnect_initial_delay=0.05, reconnect_max_delay=0.2, **own),
        gateway_channel(name),
    ]


@defer.inlineCallbacks
def start_p2p_network(test: Any, folder: Path,
                      tls: dict[str, dict[str, Any]] | None = None) -> Any:
    """
    Start the network (cleaned up with ``test``); fires with a :class:`P2PNetwork`.
    ``tls`` replaces the peer TLS block of a node by name (e.g. hd-1's from files the test
    rotates).
    """
    net = Network(test)
    net.operator(PROXY, ["proxy-providers"], [service("hd-proxy", HD, "requestConnection")])
    for name in ("hd-1", "hd-2"):
        net.operator(name, ["health-departments"], HD_SERVICES)
    proxy, ports = yield start_public_proxy(test, folder)
    yield net.start(PROXY, proxy_channels(ports))
    net.channels(PROXY, {"type": "eps_server",
                         "settings": {"address": net.server_address(PROXY)}})
    yield answer_through(test, proxy, net.gateway_url(PROXY))
    for name in ("hd-2", "hd-1"):
        net.channels(name, *HD_DIRECTORY_CHANNELS)
        yield net.start(name, hd_channels(name, (tls or {}).get(name)))
        link = yield net.channel(name, "eps_client").keeper_ready(PROXY)
        yield link.when_ready()
    return P2PNetwork(net, proxy, ports, gateway_client(test, net.gateway_url("hd-1")),
                      gateway_client(test, net.gateway_url("hd-2"), "hd-2"))
