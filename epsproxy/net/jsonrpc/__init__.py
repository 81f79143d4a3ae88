"""
JSON-RPC 2.0 over HTTP(S) (SPEC §11), one module per concept:

- :mod:`~epsproxy.net.jsonrpc.envelope`: the sans-IO envelope (ids, request parsing,
  response objects, error codes and types, the dispatcher a server serves);
- :mod:`~epsproxy.net.jsonrpc.server`: the twisted.web server (the resource, the guarded
  site with its capped request, :func:`jsonrpc_site`, :func:`listen_jsonrpc`, the server
  settings);
- :mod:`~epsproxy.net.jsonrpc.client`: the treq client (capped body, quiet pool, the
  client settings).

This module only re-exports their public names (as treq and klein do); code inside
epsproxy imports from the module that defines a name.
"""

from epsproxy.net.jsonrpc.client import (
    JSONRPC_CLIENT_SETTINGS,
    CappedBody,
    JSONRPCClient,
    QuietConnectionPool,
)
from epsproxy.net.jsonrpc.envelope import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_RESULT,
    PARSE_ERROR,
    CallContext,
    Dispatcher,
    Handler,
    JSONRPCError,
    RPCRequest,
    TransportError,
    id_from_internal,
    id_to_internal,
    parse_request,
    random_id,
    response_object,
)
from epsproxy.net.jsonrpc.server import (
    JSONRPC_SERVER_SETTINGS,
    REFUSAL_REASONS,
    CappedRequest,
    GuardedSite,
    JSONRPCResource,
    jsonrpc_site,
    listen_jsonrpc,
)

__all__ = [
    "JSONRPCError",
    "TransportError",
    "PARSE_ERROR",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "INTERNAL_ERROR",
    "NO_RESULT",
    "RPCRequest",
    "CallContext",
    "Handler",
    "Dispatcher",
    "random_id",
    "id_to_internal",
    "id_from_internal",
    "parse_request",
    "response_object",
    "JSONRPC_SERVER_SETTINGS",
    "REFUSAL_REASONS",
    "JSONRPC_CLIENT_SETTINGS",
    "JSONRPCResource",
    "GuardedSite",
    "jsonrpc_site",
    "listen_jsonrpc",
    "JSONRPCClient",
    "CappedBody",
    "CappedRequest",
    "QuietConnectionPool",
]
