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
    # What renewals of this certificate may claim (from the join token it descends
    # from, or its own SANs when issued by hand): comma-separated patterns / CIDRs.
    Column("allowed_dns", Text, nullable=False, default=""),
    Column("allowed_ips", Text, nullable=False, default=""),
    UniqueConstraint("issuer", "serial", name="uq_certificates_issuer_serial"),
    Index("ix_certificates_serial", "serial"),
    Index("ix_certificates_spiffe_id", "spiffe_id"),
    Index("ix_certificates_not_after", "not_after"),
    Index("ix_certificates_revoked_at", "revoked_at"),
)

#: The CA's own certificates once a rotation started (see migration 0009 and
#: :mod:`trustmesh.store._issuers`). Times are Unix seconds.
ca_issuers = Table(
    "ca_issuers",
    metadata,
    Column("ski", String(64), primary_key=True),  # SKI hex, the certificates' issuer
    Column("role", String(16), nullable=False),  # root | intermediate
    Column("generation", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # prepared|active|previous|retired
    Column("parent", String(64), nullable=True),  # SKI of the root that signed it
    Column("certificate_pem", Text, nullable=False),
    Column("cross_pem", Text, nullable=True),  # a root certified by the other root
    Column("key_ref", Text, nullable=False),  # "store" or "file:NAME" (later pkcs11:)
    Column("key_pem", Text, nullable=True),  # encrypted with the CA passphrase
    Column("not_after", BigInteger, nullable=False),
    Column("prepared_at", BigInteger, nullable=False),
    Column("activated_at", BigInteger, nullable=True),
    Column("superseded_at", BigInteger, nullable=True),
    Column("retired_at", BigInteger, nullable=True),
    UniqueConstraint("role", "generation", name="uq_ca_issuers_role_generation"),
)

#: Named monotonic counters: ``audit_seq``, ``crl_number``, ``ca_state``.
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
    # SANs an enrollment with the token may claim (comma-separated; empty: none).
    Column("dns_patterns", Text, nullable=False, default=""),
    Column("ip_ranges", Text, nullable=False, default=""),
)

#: Registration entries: the CA signs ``spiffe_id`` for the node agent ``node_id`` only,
#: and that agent hands it to local callers matching every selector (JSON list).
registration_entries = Table(
    "registration_entries",
    metadata,
    Column("entry_id", String(36), primary_key=True),  # UUID
    Column("spiffe_id", Text, nullable=False),
    Column("node_id", Text, nullable=False),
    Column("selectors", Text, nullable=False),  # JSON list of "type:key:value"
    Column("dns", Text, nullable=False, default=""),  # comma-separated
    Column("ttl", Integer, nullable=True),  # seconds; None: the profile's default
    Column("created_at", BigInteger, nullable=False),
    Column("created_by", Text, nullable=False),
    Index("ix_registration_entries_node_id", "node_id"),
    Index("ix_registration_entries_spiffe_id", "spiffe_id"),
)

# --- The identity server (``idp serve``). Lists are space-separated; times Unix seconds. ---

#: OAuth clients. Secrets are kept only as a salted hash (``sha256$SALT$HEX``).
idp_clients = Table(
    "idp_clients",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("secret_hash", Text, nullable=True),
    Column("auth_method", String(32), nullable=False),
    Column("grant_types", Text, nullable=False, default=""),
    Column("scopes", Text, nullable=False, default=""),
    Column("roles", Text, nullable=False, default=""),
    Column("audience", Text, nullable=False, default=""),
    Column("redirect_uris", Text, nullable=False, default=""),
    Column("jwks", Text, nullable=True),  # JSON, for private_key_jwt
    Column("tls_spiffe_id", Text, nullable=True),  # for tls_client_auth
    Column("disabled", Integer, nullable=False, default=0),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

#: End users. Passwords are argon2id hashes.
idp_users = Table(
    "idp_users",
    metadata,
    Column("user_id", String(64), primary_key=True),
    Column("username", String(128), nullable=False, unique=True),
    Column("password_hash", Text, nullable=False),
    Column("roles", Text, nullable=False, default=""),
    Column("scopes", Text, nullable=False, default=""),
    Column("email", Text, nullable=True),
    Column("disabled", Integer, nullable=False, default=0),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

#: Token-signing keys: published from ``published_at``, sign from ``active_at``,
#: stop signing at ``retired_at`` and leave the JWKS at ``removed_at``.
idp_signing_keys = Table(
    "idp_signing_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(16), nullable=False),
    Column("private_pem", Text, nullable=False),  # encrypted with the CA passphrase
    Column("public_jwk", Text, nullable=False),  # JSON
    Column("published_at", BigInteger, nullable=False),
    Column("active_at", BigInteger, nullable=False),
    Column("retired_at", BigInteger, nullable=True),
    Column("removed_at", BigInteger, nullable=True),
)

#: Authorization codes (hash only), single use.
idp_authorization_codes = Table(
    "idp_authorization_codes",
    metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("client_id", String(64), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("scope", Text, nullable=False, default=""),
    Column("nonce", Text, nullable=True),
    Column("code_challenge", Text, nullable=False),
    Column("code_challenge_method", String(8), nullable=False),
    Column("auth_time", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("used_at", BigInteger, nullable=True),
    Column("family_id", String(64), nullable=True),  # refresh family minted from it
    # The access token minted from it, revoked if the code is replayed.
    Column("access_jti", String(64), nullable=True),
    Column("access_expires_at", BigInteger, nullable=True),
)

#: Refresh tokens (hash only). Each use rotates; reuse of a rotated one revokes the family.
idp_refresh_tokens = Table(
    "idp_refresh_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("family_id", String(64), nullable=False),
    Column("client_id", String(64), nullable=False),
    Column("user_id", String(64), nullable=True),
    Column("scope", Text, nullable=False, default=""),
    Column("auth_time", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("rotated_at", BigInteger, nullable=True),
    Column("revoked_at", BigInteger, nullable=True),
    Index("ix_idp_refresh_tokens_family_id", "family_id"),
)

#: Revoked access tokens, until they expire: the list verifiers poll.
idp_revoked_tokens = Table(
    "idp_revoked_tokens",
    metadata,
    Column("jti", String(64), primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=False),
    Index("ix_idp_revoked_tokens_expires_at", "expires_at"),
)

#: ``jti`` of private_key_jwt client assertions already used (replay protection).
idp_assertion_jtis = Table(
    "idp_assertion_jtis",
    metadata,
    Column("key", String(200), primary_key=True),  # client_id + " " + jti
    Column("expires_at", BigInteger, nullable=False),
)

#: Failed-login counters, per ``user:NAME`` and per ``ip:ADDRESS``.
idp_login_failures = Table(
    "idp_login_failures",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("window_start", BigInteger, nullable=False),
    Column("locked_until", BigInteger, nullable=True),
)
