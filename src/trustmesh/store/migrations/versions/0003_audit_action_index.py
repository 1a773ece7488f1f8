"""Index audit events by action, for the revocation feed.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_audit_events_action_seq", "audit_events", ["action", "seq"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_action_seq", "audit_events")
