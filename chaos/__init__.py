"""
``make chaos``: the dev network under steady traffic while its parts are killed and
restarted one at a time (issue 6, "Faults").

- :mod:`chaos.traffic` — paced call streams with checked answers, every outcome recorded;
- :mod:`chaos.faults` — the faults (kill -9 and restart, SIGTERM drain) and what each
  measured;
- :mod:`chaos.fork` — the forked-history fault: a second SD serving hd-2 a fork of the
  chain (issue 15);
- ``python -m chaos`` — starts the dev network with :mod:`epsproxy.dev.demo`, runs the faults
  and prints the table.
"""
