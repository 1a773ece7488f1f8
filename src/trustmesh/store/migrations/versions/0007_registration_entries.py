"""Registration entries: which node may obtain which SPIFFE ID for which local workloads.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registration_entries",
        sa.Column("entry_id", sa.String(36), primary_key=True),
        sa.Column("spiffe_id", sa.Text, nullable=False),
        sa.Column("node_id", sa.Text, nullable=False),
        sa.Column("selectors", sa.Text, nullable=False),
        sa.Column("dns", sa.Text, nullable=False),
        sa.Column("ttl", sa.Integer, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
    )
    op.create_index("ix_registration_entries_node_id", "registration_entries", ["node_id"])
    op.create_index("ix_registration_entries_spiffe_id", "registration_entries", ["spiffe_id"])


def downgrade() -> None:
    op.drop_table("registration_entries")
