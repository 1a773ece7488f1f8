"""Host-name SANs a join token allows, carried by every certificate for renewals.

``join_tokens.dns_patterns`` / ``ip_ranges`` name the DNS and IP SANs an enrollment
with the token may claim (empty: none). ``certificates.allowed_dns`` / ``allowed_ips``
keep that allowance with the certificate, so a renewal may drop SANs but never add
one beyond it. Certificates recorded before this migration are allowed exactly the
SANs they carry.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("join_tokens") as batch:
        batch.add_column(sa.Column("dns_patterns", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("ip_ranges", sa.Text, nullable=False, server_default=""))
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("allowed_dns", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("allowed_ips", sa.Text, nullable=False, server_default=""))
    # A single address is its own /32 (or /128) range: the SAN check reads CIDRs.
    op.execute("UPDATE certificates SET allowed_dns = dns")
    rows = op.get_bind().execute(sa.text("SELECT id, ips FROM certificates WHERE ips <> ''"))
    for row_id, ips in list(rows):
        ranges = ",".join(f"{ip}/128" if ":" in ip else f"{ip}/32" for ip in ips.split(",") if ip)
        op.get_bind().execute(
            sa.text("UPDATE certificates SET allowed_ips = :r WHERE id = :i"),
            {"r": ranges, "i": row_id},
        )


def downgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("allowed_ips")
        batch.drop_column("allowed_dns")
    with op.batch_alter_table("join_tokens") as batch:
        batch.drop_column("ip_ranges")
        batch.drop_column("dns_patterns")
