"""Settings read once from `NORMBENCH_*` environment variables.

With nothing set, NormBench runs on the embedded default: SQLite, a filesystem broker and
local storage under `NORMBENCH_HOME`, so one command starts a working service.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

TRAIN_QUEUE = "train"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NORMBENCH_", extra="ignore")

    home: Path = Field(Path(".normbench"), description="Directory for embedded-mode state.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in `home`.")
    broker_url: str | None = Field(None, description="Celery broker URL; default filesystem broker in `home`.")
    storage_url: str | None = Field(None, description="Dataset/checkpoint storage; default `home`/storage.")
    max_upload_bytes: int = Field(512 * 2**20, description="Largest accepted dataset upload.")
    max_epochs: int = Field(200, description="Ceiling on a job's epoch budget.")
    max_runs_per_job: int = Field(500, description="Ceiling on variants × batch sizes × seeds.")
    max_train_samples_per_job: int = Field(2 * 10**9, description="Ceiling on samples trained over all runs.")
    default_owner: str = Field("local", description="Owner of objects until API keys exist.")
    torch_threads: int = Field(0, description="Worker torch threads; 0 = torch's default.")
    lease_seconds: float = Field(30.0, gt=0, description="A run's claim expires this long after its last heartbeat.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often a training worker renews its lease.")
    max_attempts: int = Field(3, ge=1, description="Claims of a run before infrastructure failures fail it.")
    reconcile_seconds: float = Field(10.0, gt=0, description="How often each worker runs the reconciler.")
    republish_after_seconds: float = Field(
        600.0, gt=0, description="Republish a queued run whose task may be lost (broker restart) after this long."
    )
    checkpoint_every_epochs: int = Field(1, ge=1, description="Checkpoint a run every this many epochs.")
    fault_abort_job_name: str | None = Field(
        None, description="Fault-injection hook for tests: the worker process dies abruptly while training this job."
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'normbench.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.home / 'storage').resolve()}"

    @property
    def is_embedded(self) -> bool:
        return self.database_url is None or self.resolved_database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()
