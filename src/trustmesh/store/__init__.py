"""Persistence: certificates, counters and the audit chain (SQLite or PostgreSQL)."""

from ._store import CertificateRecord, Store, normalize_url, open_store

__all__ = ["CertificateRecord", "Store", "normalize_url", "open_store"]
