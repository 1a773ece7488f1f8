"""Tables, as SQLAlchemy Core metadata (the migrations create the same)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

#: Every certificate the CA handed out. Times are Unix seconds (UTC).
certificates = Table(
    "certificates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("issuer", String(64), nullable=False),  # SKI hex of the issuing CA
    Column("serial", String(40), nullable=False),  # lower-case hex, no leading zeros
    Column("spiffe_id", Text, nullable=False),
    Column("dns", Text, nullable=False, default=""),  # comma-separated
    Column("ips", Text, nullable=False, default=""),
    Column("profile", String(64), nullable=False),
    Column("key_type", String(32), nullable=False),
    Column("fingerprint", String(64), nullable=False),  # SHA-256 hex
    Column("not_before", BigInteger, nullable=False),
    Column("not_after", BigInteger, nullable=False),
    Column("issued_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
    Column("revocation_reason", String(32), nullable=True),
    Column("pem", Text, nullable=False),
    UniqueConstraint("issuer", "serial", name="uq_certificates_issuer_serial"),
    Index("ix_certificates_serial", "serial"),
    Index("ix_certificates_spiffe_id", "spiffe_id"),
    Index("ix_certificates_not_after", "not_after"),
    Index("ix_certificates_revoked_at", "revoked_at"),
)

#: Named monotonic counters: ``audit_seq``, ``crl_number``.
counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

#: The hash-chained audit log.
audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("at", BigInteger, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", String(32), nullable=False),
    Column("subject", Text, nullable=False),
    Column("details", Text, nullable=False),  # canonical JSON
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_events_action_seq", "action", "seq"),
)

#: One-time (or few-time) join tokens for first enrollment; only the hash is kept.
join_tokens = Table(
    "join_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),  # SHA-256 hex of the token
    Column("spiffe_pattern", Text, nullable=False),  # an ID or a glob
    Column("uses_left", Integer, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("created_by", Text, nullable=False),
)
