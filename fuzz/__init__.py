"""
Coverage-guided fuzzing of epsproxy's parsers of hostile input (issue 6, "Hostile input").

- :mod:`fuzz.targets`: the fuzz targets, plain functions of one ``bytes`` input that
  raise :class:`AssertionError` (or an unexpected exception) when they find a bug.  They
  import without atheris, so ``tests/test_fuzz_targets.py`` runs them under ``make test``.
- :mod:`fuzz.provider`: atheris' ``FuzzedDataProvider`` when atheris is installed, else
  a small pure-Python stand-in with the same methods.
- :mod:`fuzz.corpus_gen`: writes the seed corpora under ``fuzz/corpus/<target>/``.
- ``python -m fuzz TARGET [libFuzzer args]`` runs one target under atheris;
  ``python -m fuzz all [-runs=N]`` runs every target in turn and prints a summary table.

See ``docs/robustness.md`` ("Fuzzing").
"""
