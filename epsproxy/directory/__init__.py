"""
The directory: what the network knows about each operator, built from signed change
records.

- :mod:`epsproxy.directory.entries` — entry dicts (SPEC §2.1), integrating records into
  them, lookups, queries, the permission check and peers (SPEC §6).
- :mod:`epsproxy.directory.chain` — verified record chains for directory clients, and
  the service directory's incremental model of its store (SPEC §7.2, §8.2, §8.3).

Nothing here touches the network.
"""

from epsproxy.directory.chain import (
    ChainError,
    RecordLog,
    StaleAppend,
    VerifiedChain,
    created_at_key,
)
from epsproxy.directory.entries import (
    CHANNEL_ALIASES,
    EntryError,
    can_call,
    canonical_channel_type,
    channel,
    integrate,
    new_entry,
    peer_groups,
    peers,
    query,
    service_for,
    settings_for,
)

__all__ = [
    "CHANNEL_ALIASES",
    "ChainError",
    "EntryError",
    "RecordLog",
    "StaleAppend",
    "VerifiedChain",
    "can_call",
    "canonical_channel_type",
    "channel",
    "created_at_key",
    "integrate",
    "new_entry",
    "peer_groups",
    "peers",
    "query",
    "service_for",
    "settings_for",
]
