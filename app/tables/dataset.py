"""A dataset a user uploaded (or a built-in one), stored once in canonical `.npz` form."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, String
from sqlalchemy.orm import Mapped, mapped_column

from app.tables.base import Base, JsonType, UtcDateTime, new_id, utcnow


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    owner: Mapped[str | None] = mapped_column(String(64), index=True)  # NULL: built in, visible to all
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # image | tabular | signal
    shape: Mapped[list[int]] = mapped_column(JsonType)  # (C, H, W) or (F,)
    num_classes: Mapped[int]
    class_names: Mapped[list[str]] = mapped_column(JsonType)
    num_samples: Mapped[int]
    split_sizes: Mapped[dict[str, Any]] = mapped_column(JsonType)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_uri: Mapped[str] = mapped_column(String(1000))
    # What the upload's conversion did (text: tokens, stored length, truncated texts); NULL when nothing to say.
    summary: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
