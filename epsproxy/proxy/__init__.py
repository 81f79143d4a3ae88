"""The proxy: token rendezvous and splicing at the internal endpoint (SPEC §14, §15)."""
