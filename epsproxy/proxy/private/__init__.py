"""
The private proxy (SPEC §14.5; issue 5), one module per concept:

- :mod:`~epsproxy.proxy.private.forwarding`: raw forwarding of incoming connections and
  the PROXY protocol v2 header;
- :mod:`~epsproxy.proxy.private.terminating`: TLS terminated here, each HTTP request (or
  JSON-RPC call) forwarded to the internal server;
- :mod:`~epsproxy.proxy.private.pool`: the pool of pre-dialled connections kept at the
  public proxies (issue 14), each served by the forwarder once its header is read;
- :mod:`~epsproxy.proxy.private.api`: the JSON-RPC methods the own endpoint server and the
  public proxy call;
- :mod:`~epsproxy.proxy.private.service`: the service that wires them, with the
  announcement store and the re-announcing loop.
"""
