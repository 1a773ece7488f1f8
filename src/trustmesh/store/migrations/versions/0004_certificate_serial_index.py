"""Index certificates by serial alone.

Lookups by serial (revocation checks on every mTLS request, OCSP, renewals) do not
know the issuer, so the UNIQUE (issuer, serial) index could not serve them and
every lookup scanned the table.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_certificates_serial", "certificates", ["serial"])


def downgrade() -> None:
    op.drop_index("ix_certificates_serial", "certificates")
