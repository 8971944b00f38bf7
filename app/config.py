"""Settings read once from `NORMBENCH_*` environment variables.

With nothing set, NormBench runs on the embedded default: SQLite, a filesystem broker and
local storage under `NORMBENCH_HOME`, so one command starts a working service.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TRAIN_QUEUE = "train"
MAX_AUTO_WORKERS = 8  # `workers` = 0 starts one worker per core up to this many (each holds its own torch)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, a container's cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NORMBENCH_", extra="ignore")

    home: Path = Field(Path(".normbench"), description="Directory for embedded-mode state.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in `home`.")
    broker_url: str | None = Field(None, description="Celery broker URL; default filesystem broker in `home`.")
    broker_key_prefix: str = Field("", description="Prefix for every Redis key, so deployments can share a Redis.")
    storage_url: str | None = Field(
        None,
        description="Dataset/checkpoint storage: `file:///dir` (or a plain path) or `s3://bucket/prefix` (AWS S3 or an "
        "S3-compatible server such as MinIO); default `home`/storage. Workers on other machines need S3.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible server for an `s3://` storage URL (MinIO: `http://minio:9000`); unset: AWS."
    )
    s3_region: str | None = Field(None, description="Region of the `s3://` bucket; unset: boto's default.")
    s3_access_key_id: str | None = Field(
        None, description="Access key of the `s3://` storage; unset: boto's chain (AWS_* variables, instance role)."
    )
    s3_secret_access_key: SecretStr | None = Field(None, description="Secret key matching `s3_access_key_id`.")
    cache_dir: Path | None = Field(
        None, description="Where a worker caches datasets from `s3://` storage, by sha256; default `home`/cache."
    )
    cache_max_bytes: int = Field(
        20 * 2**30, ge=0, description="Size limit of the dataset cache; least recently used datasets go first."
    )
    max_upload_bytes: int = Field(512 * 2**20, description="Largest accepted dataset upload.")
    max_weights_bytes: int = Field(
        512 * 2**20, description="Largest accepted weights upload (a safetensors file; a ResNet-50 is about 100 MB)."
    )
    max_epochs: int = Field(200, description="Ceiling on a job's epoch budget.")
    max_runs_per_job: int = Field(500, description="Ceiling on variants × batch sizes × seeds.")
    max_train_samples_per_job: int = Field(2 * 10**9, description="Ceiling on samples trained over all runs.")
    default_owner: str = Field(
        "local", description="Owner of every object while API keys are off (loopback-only embedded mode)."
    )
    require_api_keys: bool = Field(
        False,
        description="Require `Authorization: Bearer nb_...` API keys. Off: everyone is `default_owner`, "
        "allowed only while the API is bound to loopback.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for the /v1/admin/keys endpoints; unset disables them (use `normbench-admin`).",
    )
    bind_host: str | None = Field(
        None,
        description="Address the API listens on, for the loopback check when keys are off "
        "(default: uvicorn's --host, else 127.0.0.1). Checked at start-up together with the --host given and, "
        "once the server is listening, with the addresses it actually bound.",
    )
    # NoDecode: a comma-separated list in the environment (`a.example,b.example`), not JSON.
    allowed_hosts: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Host names the API answers to (the `Host` header, port ignored; `*` any, `.example.org` the "
        "domain and its subdomains), comma-separated; others get 400 (DNS-rebinding guard). Unset: loopback names "
        "only (localhost, 127.0.0.1, [::1]) when keys are off, any host when keys are on.",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Keys off: browser origins (`https://ui.example:8443`) besides the API's own that may send "
        "POST/PUT/PATCH/DELETE, comma-separated; other cross-site requests get 403 (CSRF guard).",
    )
    metrics_public: bool | None = Field(
        None,
        description="Serve GET /metrics without a token. Unset: public when keys are off (loopback only), else "
        "only with `Authorization: Bearer <NORMBENCH_ADMIN_TOKEN>`.",
    )
    max_request_bytes: int = Field(1 * 2**20, description="Largest request body other than a dataset upload.")
    max_decompressed_bytes: int = Field(
        2 * 2**30, description="Largest decompressed content of an upload (npz members, zip entries, CSV)."
    )
    max_zip_entries: int = Field(200_000, description="Most entries in an uploaded .zip/.npz archive.")
    max_image_pixels: int = Field(4096 * 4096, description="Largest image (width × height) decoded from a .zip.")
    max_image_side: int = Field(
        1024,
        ge=8,
        description="Longest side, in pixels, of an uploaded image (.zip or .npz): images are stored at their own "
        "resolution up to this; larger ones are refused with 422 (a job resizes on the device with `input`).",
    )
    max_csv_rows: int = Field(5_000_000, description="Most data rows in an uploaded CSV.")
    max_zip_compression_ratio: float = Field(
        200.0,
        description="Largest uncompressed/compressed ratio of a .zip entry or an .npz sample array over 1 MiB "
        "(compression-bomb guard; .npz labels and masks are exempt, bounded by max_decompressed_bytes instead).",
    )
    max_dataset_bytes_per_owner: int = Field(
        20 * 2**30, description="Quota: stored dataset bytes per owner (canonical .npz sizes)."
    )
    max_active_jobs_per_owner: int = Field(
        10, description="Quota: jobs with queued or running runs per owner at one time."
    )
    max_active_probes_per_owner: int = Field(
        4, ge=1, description="Quota: probes queued or running per owner at one time (each takes a training worker)."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Torch threads per worker process; 0 = automatic: on a CPU, the cores divided among this "
        "machine's `workers` (one each when there is a worker per core: small models lose speed to a second "
        "thread); with a GPU, torch's default.",
    )
    workers: int = Field(
        0,
        ge=0,
        le=256,
        description="Training worker processes on one machine: how many `make run` starts, and what a CPU worker "
        "divides the cores by for its torch threads. 0 = one per core (at most 8) without an NVIDIA GPU, one with.",
    )
    lease_seconds: float = Field(30.0, gt=0, description="A run's claim expires this long after its last heartbeat.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often a training worker renews its lease.")
    max_attempts: int = Field(3, ge=1, description="Claims of a run before infrastructure failures fail it.")
    reconcile_seconds: float = Field(10.0, gt=0, description="How often each worker runs the reconciler.")
    republish_after_seconds: float = Field(
        600.0,
        gt=0,
        description="Republish a queued run whose task may be lost (broker restart) after this long; the wait doubles "
        "with each republish of the run, up to `republish_max_backoff_seconds`. Only while the broker's queue holds "
        "fewer tasks than there are queued runs (a task really was lost), where the broker can say.",
    )
    republish_max_backoff_seconds: float = Field(
        3600.0, gt=0, description="Longest wait before a queued run's task is republished again."
    )
    republish_max_per_cycle: int = Field(
        200, ge=1, description="Most tasks one reconciler round republishes (never-published runs included)."
    )
    worker_memory_bytes: int = Field(
        8 * 2**30,
        ge=2**28,
        description="Memory one worker process may use (on CPU; GPU device memory is measured by the probe). The API "
        "refuses a job whose estimated peak (network state, activations at the batch size, the dataset, times the "
        "pack) is over it, and a CPU worker limits its own data segment to it (RLIMIT_DATA), so a run that still "
        "runs out of memory fails alone, as class `resource`, and the worker takes the next run.",
    )
    checkpoint_every_epochs: int = Field(1, ge=1, description="Checkpoint a run every this many epochs.")
    pack_size: int = Field(
        4,
        ge=1,
        le=256,
        description="The API's default `pack_size` for a job whose spec leaves it unset, recorded in the job's spec "
        "at submit: runs of one batch size and variant that a worker trains together, stacked, in one process "
        "(each keeps its own lease, metrics, checkpoints and outcome). 32 suits GPU workers, 4 CPU ones.",
    )
    db_pool_size: int = Field(
        12,
        ge=2,
        description="Database connections per process in the main pool (fixed size, no overflow). The API gives "
        "FastAPI's thread pool exactly this many threads, so no request thread ever waits for a connection.",
    )
    poll_threads: int = Field(
        4,
        ge=1,
        description="Threads, each with a connection of a separate small pool, reserved for status polls and "
        "event-stream polls, so other traffic cannot starve them. (Both sizes are read from the environment "
        "when a process first connects.)",
    )
    db_wait_seconds: float = Field(
        5.0, gt=0, description="A status poll that waits this long for a database thread is answered 503 + Retry-After."
    )
    db_outage_wait_seconds: float = Field(
        10.0,
        ge=0,
        description="A GET that finds the database unreachable (a restart, a fail-over) is tried again every half "
        "second for up to this long, waiting in the event loop (no thread, no connection), before it is answered "
        "503 + Retry-After: a database restart shorter than this is a slower answer, not an error. 0: answer at once.",
    )
    rate_limit_per_second: float = Field(
        100.0,
        ge=0,
        description="Requests per second each API key (keys off: the one local owner) may make to /v1, "
        "per API process, as a token bucket refilled at this rate; 0 turns the rate limit off. Over it: 429 "
        "with Retry-After, answered before any database work.",
    )
    rate_limit_burst: int = Field(1000, ge=1, description="Token-bucket size: requests one key may make at once.")
    rate_limit_in_flight: int = Field(
        32,
        ge=1,
        description="Requests of one key being handled at once (until their response starts; an open event "
        "stream does not count); more get 429 with Retry-After, so one key cannot queue ahead of everyone else.",
    )
    fault_abort_job_name: str | None = Field(
        None, description="Fault-injection hook for tests: the worker process dies abruptly while training this job."
    )

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def resolved_metrics_public(self) -> bool:
        return (not self.require_api_keys) if self.metrics_public is None else self.metrics_public

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'normbench.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        # The host is unused by the filesystem transport; naming it stops kombu's "No hostname was supplied".
        return self.broker_url or "filesystem://localhost/"

    @property
    def broker_dir(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def resolved_storage_url(self) -> str:
        return self.storage_url or f"file://{(self.home / 'storage').resolve()}"

    @property
    def resolved_cache_dir(self) -> Path:
        return (self.cache_dir or self.home / "cache").resolve()

    @property
    def resolved_workers(self) -> int:
        if self.workers:
            return self.workers
        if Path("/dev/nvidia0").exists():  # a GPU: one worker drives it, as before (torch is not imported here)
            return 1
        return min(usable_cores(), MAX_AUTO_WORKERS)

    def cpu_threads(self) -> int:
        """Torch threads for a CPU worker process: the setting, or this machine's cores shared by its workers."""
        return self.torch_threads or max(1, usable_cores() // self.resolved_workers)

    @property
    def is_embedded(self) -> bool:
        return self.database_url is None or self.resolved_database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    return Settings()


class UnsafeBind(RuntimeError):
    """The API would serve without API keys on a non-loopback address."""


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a hostname other than localhost, or "" (all interfaces)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def configured_bind_hosts(settings: Settings, argv: list[str] | None = None) -> list[str]:
    """Every address this process was told to listen on: NORMBENCH_BIND_HOST, and uvicorn's `--host` (the last
    one given, which is the one uvicorn uses), else UVICORN_HOST, else uvicorn's default 127.0.0.1."""
    args = sys.argv if argv is None else argv
    cli: str | None = None
    for i, arg in enumerate(args):
        if arg == "--host" and i + 1 < len(args):
            cli = args[i + 1]
        elif arg.startswith("--host="):
            cli = arg.split("=", 1)[1]
    hosts = [settings.bind_host] if settings.bind_host else []
    if cli is not None or not hosts:
        hosts.append(cli if cli is not None else os.environ.get("UVICORN_HOST", "127.0.0.1"))
    return hosts


def configured_bind_host(settings: Settings, argv: list[str] | None = None) -> str:
    """The configured address to judge: the first non-loopback one of `configured_bind_hosts`, else the first."""
    hosts = configured_bind_hosts(settings, argv)
    return next((h for h in hosts if not is_loopback(h)), hosts[0])


def check_bind_safety(settings: Settings, host: str | None = None) -> None:
    """Refuse to serve without API keys anywhere but loopback.

    Called at API start-up (app.api.lifespan) with `configured_bind_host`, and with every address the
    process really listens on (app.api.bind_check); a launcher that knows its bind address
    (app.devserver) can call it with that address before starting anything.
    """
    host = configured_bind_host(settings) if host is None else host
    if settings.require_api_keys or is_loopback(host):
        return
    raise UnsafeBind(
        f"refusing to start: API keys are off (NORMBENCH_REQUIRE_API_KEYS=false) and the API would listen on "
        f"{host!r}, which is not a loopback address, so anyone who can reach it would act as owner "
        f"{settings.default_owner!r}. Either bind to 127.0.0.1, or set NORMBENCH_REQUIRE_API_KEYS=true and "
        "create keys with `normbench-admin create-key --owner NAME`."
    )
