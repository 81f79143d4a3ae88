"""
The EPS-to-EPS links (docs/protocol.md): the line format (:mod:`.wire`), who the peer is
(:mod:`.peers`), one link as a sans-IO machine (:mod:`.session`) and the protocol that
feeds it (:mod:`.protocol`).  Nothing here knows the broker.
"""
