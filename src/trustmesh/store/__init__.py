"""Persistence: certificates, counters, join tokens and the audit chain (SQLite or PostgreSQL)."""

from ._store import (
    REVOCATION_CHANNEL,
    CertificateRecord,
    RevocationEvent,
    Store,
    normalize_url,
    open_store,
)
from ._tokens import JoinToken, add_join_token, consume_join_token, token_hash

__all__ = [
    "REVOCATION_CHANNEL",
    "CertificateRecord",
    "JoinToken",
    "RevocationEvent",
    "Store",
    "add_join_token",
    "consume_join_token",
    "normalize_url",
    "open_store",
    "token_hash",
]
