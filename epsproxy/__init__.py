"""
epsproxy: an end-to-end messaging network for organisations that must exchange data
securely.

Three programs, each a twistd plugin: ``twistd sd`` (the signed service directory),
``twistd eps`` (the endpoint server of one operator) and ``twistd proxy`` (the
TLS-passthrough proxy that also brokers peer-to-peer connections).
"""

__version__ = "0.1.0"
