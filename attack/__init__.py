"""
``make attack``: hostile input against every listener of the dev network, with legitimate
traffic running, each attack refused, counted in metrics and harmless to the rest
(issue 6).  See ``python -m attack --help`` and docs/robustness.md.
"""
