"""A probe: a short measured training run on a worker that finds the batch sizes a network affords."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.tables.base import Base, JsonType, UtcDateTime, new_id, utcnow


class Probe(Base):
    __tablename__ = "probes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    # A probe describes one dataset's shapes: it goes when the dataset goes.
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)  # the validated request, arch resolved
    budget: Mapped[dict[str, Any]] = mapped_column(JsonType)  # train_size, val_size
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued | running | succeeded | failed
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # As a run's (app.repositories.publishing): when its task was last sent, and how many were.
    published_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    publish_count: Mapped[int] = mapped_column(default=0, server_default="0")
