"""
Network helpers the three programs share: TLS policy and endpoints, the HTTP CONNECT
client, host/port parsing, rate limits, the JSON-RPC server and client, the metrics
listener, the service life cycle and the rendezvous token.
"""
