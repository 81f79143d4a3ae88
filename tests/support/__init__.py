"""
Helpers shared by the test modules, one module per concept (the test PKI, TLS settings
and loopback TLS parties, whole endpoint servers, the service directory, Redis, ...).

Test modules import helpers from here, never from one another
(``tests/test_support_imports.py`` keeps it so).  Tests are ``twisted.trial`` TestCases
so that both ``pytest`` (the README's runner) and ``trial tests`` run them.
"""
