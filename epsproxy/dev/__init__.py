"""
Developer tooling, never needed by an operator's node: the dev PKI (``eps certs``), the
dev network (``make demo``) and the example local services.
"""
