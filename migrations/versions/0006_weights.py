"""weights (uploaded safetensors state dicts) and jobs.weights_id"""

# Created 2026-12-02.

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "weights",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("arch", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("storage_uri", sa.String(length=1000), nullable=False),
        sa.Column("tensor_count", sa.Integer(), nullable=False),
        sa.Column("parameter_count", sa.BigInteger(), nullable=False),
        sa.Column("dtypes", JSON, nullable=False),
        sa.Column("has_bn_stats", sa.Boolean(), nullable=False),
        sa.Column("has_gn_weights", sa.Boolean(), nullable=False),
        sa.Column("head_classes", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_weights")),
    )
    op.create_index(op.f("ix_weights_owner"), "weights", ["owner"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("weights_id", sa.String(length=64), nullable=True))
        batch.create_index(batch.f("ix_jobs_weights_id"), ["weights_id"], unique=False)
        batch.create_foreign_key(
            batch.f("fk_jobs_weights_id_weights"), "weights", ["weights_id"], ["id"], ondelete="RESTRICT"
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(batch.f("fk_jobs_weights_id_weights"), type_="foreignkey")
        batch.drop_index(batch.f("ix_jobs_weights_id"))
        batch.drop_column("weights_id")
    op.drop_index(op.f("ix_weights_owner"), table_name="weights")
    op.drop_table("weights")
