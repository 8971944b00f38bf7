"""runs.pack_key (deterministic pack composition), runs.publish_count (republish back-off),
runs.failure_class (infrastructure / data / resource / divergence)
"""

# Created 2026-11-30.

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("pack_key", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("publish_count", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("failure_class", sa.String(length=16), nullable=True))
    op.create_index(op.f("ix_runs_job_id_pack_key"), "runs", ["job_id", "pack_key"])


def downgrade() -> None:
    op.drop_index(op.f("ix_runs_job_id_pack_key"), table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("failure_class")
        batch.drop_column("publish_count")
        batch.drop_column("pack_key")
