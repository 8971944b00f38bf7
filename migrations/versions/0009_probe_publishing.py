"""probes.published_at, probes.publish_count: the reconciler sends a probe's task again when the broker lost it

Probes stored before this were published when they were created: they are recorded so.
"""

# Created 2026-11-30.

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    with op.batch_alter_table("probes") as batch:
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("publish_count", sa.Integer(), server_default="0", nullable=False))
    op.execute("UPDATE probes SET published_at = created_at, publish_count = 1")


def downgrade() -> None:
    with op.batch_alter_table("probes") as batch:
        batch.drop_column("publish_count")
        batch.drop_column("published_at")
