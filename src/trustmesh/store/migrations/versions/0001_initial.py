"""Certificates, counters and the audit log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("serial", sa.String(40), nullable=False),
        sa.Column("spiffe_id", sa.Text, nullable=False),
        sa.Column("dns", sa.Text, nullable=False),
        sa.Column("ips", sa.Text, nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("key_type", sa.String(32), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("not_before", sa.BigInteger, nullable=False),
        sa.Column("not_after", sa.BigInteger, nullable=False),
        sa.Column("issued_at", sa.BigInteger, nullable=False),
        sa.Column("revoked_at", sa.BigInteger, nullable=True),
        sa.Column("revocation_reason", sa.String(32), nullable=True),
        sa.Column("pem", sa.Text, nullable=False),
        sa.UniqueConstraint("issuer", "serial", name="uq_certificates_issuer_serial"),
    )
    op.create_index("ix_certificates_spiffe_id", "certificates", ["spiffe_id"])
    op.create_index("ix_certificates_not_after", "certificates", ["not_after"])
    op.create_index("ix_certificates_revoked_at", "certificates", ["revoked_at"])
    op.create_table(
        "counters",
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(
        sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger)),
        [{"name": "audit_seq", "value": 0}, {"name": "crl_number", "value": 0}],
    )
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("counters")
    op.drop_table("certificates")
