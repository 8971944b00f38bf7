"""runs.status is one of the run states (a CHECK constraint)"""

# Created 2026-11-30.

from alembic import op

revision = "0004"
down_revision = "0003"

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
