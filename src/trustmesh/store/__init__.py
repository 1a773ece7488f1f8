"""Persistence: certificates, counters, join tokens and the audit chain (SQLite or PostgreSQL)."""

from ._store import CertificateRecord, Store, normalize_url, open_store
from ._tokens import JoinToken, add_join_token, consume_join_token, token_hash

__all__ = [
    "CertificateRecord",
    "JoinToken",
    "Store",
    "add_join_token",
    "consume_join_token",
    "normalize_url",
    "open_store",
    "token_hash",
]
