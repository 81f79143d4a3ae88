"""
``make soak``: the dev network under sustained, checked load (issue 6, "Load and soak").

- :mod:`soak.load` — the load process: asyncio + ssl clients (HTTPS echo through the SNI
  path, JSON-RPC ``hd-2._ping`` through hd-1's gateway), every answer checked by SHA-256;
- :mod:`soak.report` — per-stream statistics, process samples (RSS, open fds) and the
  markdown tables;
- ``python -m soak`` — starts the dev network with :mod:`epsproxy.dev.demo`, runs the load,
  samples every process every 5 s, waits for the fds to come back and prints the report.
"""
