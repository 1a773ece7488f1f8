"""The CA's own issuers, for staged rotation of the intermediate and the root.

``ca_issuers`` holds one row per CA certificate (root or intermediate) once a rotation
has started: its certificate, where its key is (``key_ref``; ``store`` means the
encrypted PEM in ``key_pem``, ``file:NAME`` a file in TRUSTMESH_HOME), its state
(``prepared``: in the bundle, not signing; ``active``: signing; ``previous``: no
longer signing, still in the bundle, CRLs and OCSP; ``retired``: gone) and when each
stage happened. A root row may carry ``cross_pem``: the root certified by the other
root of its rotation, for peers that trust only that one. The ``ca_state`` counter
grows with every change; it is the SPIFFE bundle sequence, and ``ca serve`` replicas
poll it to pick up a step done elsewhere.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ca_issuers",
        sa.Column("ski", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("parent", sa.String(64), nullable=True),
        sa.Column("certificate_pem", sa.Text, nullable=False),
        sa.Column("cross_pem", sa.Text, nullable=True),
        sa.Column("key_ref", sa.Text, nullable=False),
        sa.Column("key_pem", sa.Text, nullable=True),
        sa.Column("not_after", sa.BigInteger, nullable=False),
        sa.Column("prepared_at", sa.BigInteger, nullable=False),
        sa.Column("activated_at", sa.BigInteger, nullable=True),
        sa.Column("superseded_at", sa.BigInteger, nullable=True),
        sa.Column("retired_at", sa.BigInteger, nullable=True),
        sa.UniqueConstraint("role", "generation", name="uq_ca_issuers_role_generation"),
    )
    op.bulk_insert(
        sa.table("counters", sa.column("name", sa.String), sa.column("value", sa.BigInteger)),
        [{"name": "ca_state", "value": 1}],
    )


def downgrade() -> None:
    op.execute("DELETE FROM counters WHERE name = 'ca_state'")
    op.drop_table("ca_issuers")
