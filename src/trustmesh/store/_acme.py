"""The ACME server's tables (RFC 8555): nonces, EAB keys, accounts, orders, authorizations.

:mod:`trustmesh.acme` queries them with SQLAlchemy Core inside :meth:`Store.transaction`,
like the identity server does with its ``idp_*`` tables. Times are Unix seconds (UTC);
JSON columns hold compact JSON text. Migration ``0008`` creates the same.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, String, Table, Text

from ._schema import metadata

__all__ = [
    "acme_accounts",
    "acme_authorizations",
    "acme_challenges",
    "acme_eab_keys",
    "acme_nonces",
    "acme_orders",
]

#: Replay nonces handed out and not yet used (RFC 8555 6.5): single-use, short-lived.
acme_nonces = Table(
    "acme_nonces",
    metadata,
    Column("nonce", String(64), primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_acme_nonces_expires_at", "expires_at"),
)

#: External account binding keys (RFC 8555 7.3.4), encrypted; each binds one account.
acme_eab_keys = Table(
    "acme_eab_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("provisioner", String(64), nullable=False),
    Column("key_sealed", Text, nullable=False),  # AES-GCM nonce + ciphertext, base64
    Column("created_at", BigInteger, nullable=False),
    Column("account_id", String(64), nullable=True),
    Column("bound_at", BigInteger, nullable=True),
)

#: ACME accounts: one per account key (JWK thumbprint, RFC 7638) and provisioner.
acme_accounts = Table(
    "acme_accounts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("provisioner", String(64), nullable=False),
    Column("thumbprint", String(64), nullable=False, unique=True),
    Column("jwk", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("contact", Text, nullable=False),
    Column("eab_kid", String(64), nullable=True),
    Column("created_at", BigInteger, nullable=False),
)

#: Orders; ``serial`` names the certificate once the order is valid.
acme_orders = Table(
    "acme_orders",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("provisioner", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("identifiers", Text, nullable=False),
    Column("profile", String(64), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("error", Text, nullable=True),
    Column("serial", String(40), nullable=True),
    Column("replaces", Text, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("ix_acme_orders_account_id", "account_id"),
    Index("ix_acme_orders_expires_at", "expires_at"),
    Index("ix_acme_orders_serial", "serial"),
)

#: One authorization per identifier of an order.
acme_authorizations = Table(
    "acme_authorizations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("order_id", String(64), nullable=False),
    Column("account_id", String(64), nullable=False),
    Column("identifier_type", String(8), nullable=False),
    Column("identifier_value", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_acme_authorizations_order_id", "order_id"),
)

#: The challenges of an authorization (one per allowed type).
acme_challenges = Table(
    "acme_challenges",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("authz_id", String(64), nullable=False),
    Column("type", String(16), nullable=False),
    Column("token", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("validated_at", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
    Index("ix_acme_challenges_authz_id", "authz_id"),
)
