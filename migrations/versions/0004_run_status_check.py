"""runs.status is one of the run states (a CHECK constraint)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The states as of this revision, spelled out: a migration records history, so it must not follow
# later edits of app.core.run_states.RunStatus (a new state gets its own migration).
STATES = ("queued", "running", "succeeded", "failed", "diverged", "cancelled")
CONDITION = "status IN (" + ", ".join(f"'{s}'" for s in STATES) + ")"


def upgrade() -> None:
    # batch mode: SQLite cannot add a constraint to an existing table, so Alembic copies the table.
    with op.batch_alter_table("runs") as batch:
        batch.create_check_constraint(op.f("ck_runs_status"), CONDITION)


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint(op.f("ck_runs_status"), type_="check")
