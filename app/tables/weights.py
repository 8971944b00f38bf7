"""Pretrained weights a user uploaded (a safetensors state dict for one architecture), stored once as uploaded."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, String
from sqlalchemy.orm import Mapped, mapped_column

from app.tables.base import Base, JsonType, UtcDateTime, new_id, utcnow


class Weights(Base):
    __tablename__ = "weights"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    arch: Mapped[str] = mapped_column(String(64))  # an app.core.arch_manifests architecture
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    storage_uri: Mapped[str] = mapped_column(String(1000))
    tensor_count: Mapped[int]
    parameter_count: Mapped[int] = mapped_column(BigInteger)
    dtypes: Mapped[list[str]] = mapped_column(JsonType)
    has_bn_stats: Mapped[bool] = mapped_column(Boolean)  # running mean/var of every BatchNorm layer
    has_gn_weights: Mapped[bool] = mapped_column(Boolean)  # norm affine weights, no statistics: GroupNorm-trained
    head_classes: Mapped[int | None]  # classes of the uploaded head; None when it was left out
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
