"""
The EPS-to-EPS links (docs/protocol.md): the line format (:mod:`.wire`), who the peer is
(:mod:`.peers`), one link as a sans-IO machine (:mod:`.session`) and the protocol that
feeds it (:mod:`.protocol`), the open links of a node (:mod:`.registry`) and the links
it dials or keeps (:mod:`.dialer`).  Nothing here knows the broker: requests arrive at a
``serve`` callable and proxies are asked through a ``request_connection`` callable,
both given at construction (:mod:`epsproxy.eps.inbox` provides them).
"""
