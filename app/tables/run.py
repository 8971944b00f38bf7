"""One training run of a job: a variant at a batch size with a seed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, Float, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.run_states import RunStatus
from app.tables.base import Base, JsonType, UtcDateTime, new_id, utcnow

# Named "status" → ck_runs_status by the naming convention; migration 0004 creates it.
STATUS_CHECK = CheckConstraint("status IN (" + ", ".join(f"'{s.value}'" for s in RunStatus) + ")", name="status")


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_job_id_status", "job_id", "status"),
        Index("ix_runs_job_id_pack_key", "job_id", "pack_key"),
        STATUS_CHECK,
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    owner: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(100))  # label, e.g. "gn(16)"
    variant_index: Mapped[int]
    norm: Mapped[str] = mapped_column(String(32))
    norm_params: Mapped[dict[str, Any]] = mapped_column(JsonType)
    batch_size: Mapped[int]
    seed: Mapped[int]
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.QUEUED, index=True)
    attempt: Mapped[int] = mapped_column(default=0)  # fencing token, bumped on every claim
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # last time a task was sent for it
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    steps_done: Mapped[int] = mapped_column(default=0)
    samples_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    epochs_done: Mapped[int] = mapped_column(default=0)
    wall_time_s: Mapped[float | None] = mapped_column(Float)
    final_metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    environment: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    checkpoint_uri: Mapped[str | None] = mapped_column(String(1000))
    # Runs with one pack key train together: a function of the job spec, so results never depend on scheduling.
    pack_key: Mapped[str | None] = mapped_column(String(200))
    publish_count: Mapped[int] = mapped_column(default=0, server_default="0")  # tasks sent; spaces out republishing
    failure_class: Mapped[str | None] = mapped_column(String(16))  # infrastructure | data | resource | divergence
