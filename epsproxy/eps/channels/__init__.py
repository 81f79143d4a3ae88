"""The channels an EPS broker delivers through (SPEC §12), one module per kind."""
