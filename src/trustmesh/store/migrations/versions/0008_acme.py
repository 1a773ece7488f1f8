"""The ACME server's tables: nonces, EAB keys, accounts, orders, authorizations, challenges.

Revision ID: 0008
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "acme_nonces",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_acme_nonces_expires_at", "acme_nonces", ["expires_at"])
    op.create_table(
        "acme_eab_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("provisioner", sa.String(64), nullable=False),
        sa.Column("key_sealed", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=True),
        sa.Column("bound_at", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "acme_accounts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("provisioner", sa.String(64), nullable=False),
        sa.Column("thumbprint", sa.String(64), nullable=False, unique=True),
        sa.Column("jwk", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("contact", sa.Text, nullable=False),
        sa.Column("eab_kid", sa.String(64), nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "acme_orders",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("provisioner", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("identifiers", sa.Text, nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("serial", sa.String(40), nullable=True),
        sa.Column("replaces", sa.Text, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_acme_orders_account_id", "acme_orders", ["account_id"])
    op.create_index("ix_acme_orders_expires_at", "acme_orders", ["expires_at"])
    op.create_index("ix_acme_orders_serial", "acme_orders", ["serial"])
    op.create_table(
        "acme_authorizations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("order_id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("identifier_type", sa.String(8), nullable=False),
        sa.Column("identifier_value", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_acme_authorizations_order_id", "acme_authorizations", ["order_id"])
    op.create_table(
        "acme_challenges",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("authz_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("validated_at", sa.BigInteger, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_index("ix_acme_challenges_authz_id", "acme_challenges", ["authz_id"])


def downgrade() -> None:
    for table in (
        "acme_challenges",
        "acme_authorizations",
        "acme_orders",
        "acme_accounts",
        "acme_eab_keys",
        "acme_nonces",
    ):
        op.drop_table(table)
