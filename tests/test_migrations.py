"""Alembic is the only way the schema changes: head matches the models on Postgres and SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.devserver import alembic_config
from app.tables import Base
from tests.support import SESSION, drop_database, recreate_database


def pending_diff(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.services), "sqlite"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name = f"normbench_migration_{SESSION}"
    yield recreate_database(name)
    drop_database(name)


def test_upgrade_head_matches_models_and_downgrades(empty_database: str) -> None:
    cfg = alembic_config(empty_database)
    command.upgrade(cfg, "head")
    tables = set(inspect(create_engine(empty_database)).get_table_names())
    assert {"datasets", "jobs", "runs", "metric_points"} <= tables
    assert pending_diff(empty_database) == []
    command.downgrade(cfg, "base")
    assert set(inspect(create_engine(empty_database)).get_table_names()) <= {"alembic_version"}
