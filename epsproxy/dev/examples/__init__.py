"""Small example services used by the dev roles and the demos (SPEC §21.3)."""
