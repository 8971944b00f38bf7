"""The Dockerfile and docker-compose.yml agree with the code they deploy.

Pure file parsing plus one `docker-compose config -q`; no images are built and no engine is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from app.config import TRAIN_QUEUE, Settings
from app.devserver import KEEP_ALIVE_SECONDS, api_command

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def _option(cmd: list[str], *names: str) -> str:
    for i, part in enumerate(cmd):
        if part in names:
            return cmd[i + 1]
        for name in names:
            if name.startswith("--") and part.startswith(name + "="):
                return part.split("=", 1)[1]
    raise AssertionError(f"none of {names} in {cmd}")


def _interpolate(text: str) -> str:
    """Compose's `${VAR:-default}` gives its default here and a required `${VAR:?message}` a stand-in secret."""

    def value(m: re.Match[str]) -> str:
        op, arg = m.group(2) or "", m.group(3) or ""
        return arg if op in (":-", "-") else "test-secret"

    return re.sub(r"\$\{(\w+)(:?[-?])?([^}]*)\}", value, text)


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): _interpolate(str(v)) for k, v in env.items()}


def _api_server_command(api: dict) -> list[str]:
    """The API's server command: the whole command, or what a `sh -c` script finally `exec`s."""
    cmd = _command(api)
    if cmd[:2] == ["sh", "-c"]:
        last = [line.strip() for line in cmd[2].splitlines() if line.strip().startswith("exec ")][-1]
        return last.removeprefix("exec ").split()
    return cmd


def _volume_mounts(service: dict) -> dict[str, str]:
    """Container path -> source (named volume or host path)."""
    mounts = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol.get("source", ""), vol["target"]
        mounts[target.rstrip("/")] = source
    return mounts


def _dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instruction lines (continuations joined, comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lines.append(pending)
        pending = ""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        match = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, flags=re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(1) or f"<unnamed {len(stages)}>", [])
        if current is not None:
            current.append(line)
    return stages


def _stage_chain(stages: dict[str, list[str]], name: str) -> list[str]:
    """All instructions that build stage `name`, its parent stages' first."""
    lines = stages[name]
    parent = lines[0].split()[1]
    return (_stage_chain(stages, parent) if parent in stages and parent != name else []) + lines


def _installs_torch(lines: list[str]) -> bool:
    """Whether any `pip install` in these instructions installs torch (directly, via an ARG, or the extra)."""
    torch_args = {m.group(1) for line in lines if (m := re.match(r"ARG\s+(\w+)=\S*torch", line, flags=re.IGNORECASE))}
    for line in lines:
        if not line.upper().startswith("RUN "):
            continue
        for step in re.split(r"&&|;|\|\|", line[4:]):
            if "pip install" not in step:
                continue
            if re.search(r"(?<![\w-])torch(?![\w-])", step) or "[worker]" in step:
                return True
            if any(re.search(rf"\${{?{arg}\b", step) for arg in torch_args):
                return True
    return False


# --- compose vs code ---------------------------------------------------------------------


def test_worker_consumes_the_train_queue(services: dict) -> None:
    cmd = _command(services["worker"])
    assert cmd[:1] == ["celery"] and "worker" in cmd
    assert _option(cmd, "-Q", "--queues") == TRAIN_QUEUE


def test_worker_celery_app_module_exists(services: dict) -> None:
    # Located with find_spec and read as text: nothing from `workers` is imported here.
    module = _option(_command(services["worker"]), "-A", "--app")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"celery -A {module}: module not found"
    source = Path(spec.origin).read_text()
    # `celery -A module` uses the module's `app`/`celery` attribute or any Celery instance in it.
    assert re.search(r"^\w+\s*=\s*Celery\(", source, flags=re.MULTILINE), f"{module} defines no Celery app"


def test_api_serves_app_main_on_the_published_port(services: dict) -> None:
    api = services["api"]
    cmd = _api_server_command(api)
    assert cmd[0] == "uvicorn" and "app.main:app" in cmd
    assert importlib.util.find_spec("app.main") is not None
    port = _option(cmd, "--port")
    container_ports = {str(p).split(":")[-1].split("/")[0] for p in api.get("ports", [])}
    assert port in container_ports, f"uvicorn listens on {port}, compose publishes {container_ports}"
    health = " ".join(map(str, api["healthcheck"]["test"]))
    assert f":{port}/readyz" in health  # the database and the broker answer, not only the process


def test_every_normbench_env_var_is_a_setting(services: dict) -> None:
    fields = set(Settings.model_fields)
    used = {name for svc in services.values() for name in _environment(svc) if name.startswith("NORMBENCH_")}
    assert used, "compose sets no NORMBENCH_* variables"
    unknown = {name for name in used if name.removeprefix("NORMBENCH_").lower() not in fields}
    assert not unknown, f"not fields of app.config.Settings: {sorted(unknown)}"


def test_app_services_point_at_the_compose_postgres_and_redis(services: dict) -> None:
    for name in ("migrate", "api", "worker"):
        env = _environment(services[name])
        assert urlparse(env["NORMBENCH_DATABASE_URL"]).hostname in services, name
        assert urlparse(env["NORMBENCH_BROKER_URL"]).hostname in services, name


def _s3_bucket(service: dict) -> str:
    url = urlparse(_environment(service)["NORMBENCH_STORAGE_URL"])
    assert url.scheme == "s3" and url.netloc, f"storage is not an s3://bucket/prefix URL: {url.geturl()}"
    return url.netloc


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_api_and_worker_share_the_minio_bucket(services: dict) -> None:
    api, worker = _environment(services["api"]), _environment(services["worker"])
    assert _s3_bucket(services["api"]) == _s3_bucket(services["worker"])
    assert api["NORMBENCH_STORAGE_URL"] == worker["NORMBENCH_STORAGE_URL"]
    endpoint = urlparse(api["NORMBENCH_S3_ENDPOINT_URL"])
    assert worker["NORMBENCH_S3_ENDPOINT_URL"] == api["NORMBENCH_S3_ENDPOINT_URL"]
    minio = services[endpoint.hostname or ""]
    assert minio["image"].startswith("minio/minio:") and _pinned(minio["image"]), minio["image"]
    assert endpoint.port == 9000 and "server" in _command(minio)
    credentials = _environment(minio)
    for env in (api, worker):
        assert env["NORMBENCH_S3_ACCESS_KEY_ID"] == credentials["MINIO_ROOT_USER"]
        assert env["NORMBENCH_S3_SECRET_ACCESS_KEY"] == credentials["MINIO_ROOT_PASSWORD"]
    assert minio["healthcheck"]["test"]
    assert any(m.rstrip("/") == "/data" for m in _volume_mounts(minio)), "minio keeps its objects in no volume"


def test_a_one_shot_service_creates_the_bucket_before_api_and_worker(services: dict) -> None:
    bucket = _s3_bucket(services["api"])
    minio = urlparse(_environment(services["api"])["NORMBENCH_S3_ENDPOINT_URL"]).hostname
    creators = [
        name
        for name, svc in services.items()
        if "command" in svc and re.search(rf"\bmc mb\b.*/{re.escape(bucket)}\b", " ".join(_command(svc)))
    ]
    assert len(creators) == 1, f"no service runs `mc mb .../{bucket}`: {creators}"
    creator = services[creators[0]]
    assert creator["image"].startswith("minio/mc:") and _pinned(creator["image"]), creator["image"]
    assert str(creator.get("restart")) == "no"
    assert f"http://{minio}:9000" in " ".join(_command(creator))
    assert creator["depends_on"][minio]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert services[name]["depends_on"][creators[0]]["condition"] == "service_completed_successfully", name


def test_the_worker_keeps_its_dataset_cache_in_a_volume(compose: dict, services: dict) -> None:
    home = _environment(services["worker"])["NORMBENCH_HOME"].rstrip("/")
    mounts = _volume_mounts(services["worker"])
    assert mounts.get(home) in (compose.get("volumes") or {}), f"nothing persistent at {home}: {mounts}"
    assert "/data/storage" not in mounts and "/data/storage" not in _volume_mounts(services["api"])


def test_worker_reserves_an_nvidia_gpu(services: dict) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") in (1, "all")
        for d in devices
    ), devices


def test_migrate_runs_alembic_and_gates_api_and_worker(services: dict) -> None:
    assert _command(services["migrate"]) == ["alembic", "upgrade", "head"]
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
    for name in ("postgres", "redis"):
        assert services[name]["healthcheck"]["test"], name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_build_targets_are_dockerfile_stages(services: dict) -> None:
    stages = _dockerfile_stages()
    assert services["api"]["build"]["target"] == "api"
    assert services["worker"]["build"]["target"] == "worker"
    for name, svc in services.items():
        if isinstance(svc.get("build"), dict) and "target" in svc["build"]:
            assert svc["build"]["target"] in stages, f"{name}: no Dockerfile stage {svc['build']['target']!r}"


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_targets_and_torch_split() -> None:
    stages = _dockerfile_stages()
    assert {"api", "worker"} <= set(stages), sorted(stages)
    assert not _installs_torch(_stage_chain(stages, "api")), "the api image must not install torch"
    assert _installs_torch(_stage_chain(stages, "worker")), "the worker image must install torch"


def test_dockerfile_copies_what_the_services_need() -> None:
    stages = _dockerfile_stages()
    for target in ("api", "worker"):
        chain = _stage_chain(stages, target)
        copied = " ".join(line for line in chain if line.upper().startswith("COPY "))
        for path in ("pyproject.toml", "app", "workers", "models", "migrations", "alembic.ini"):
            assert re.search(rf"(?<![\w./-]){re.escape(path)}(?![\w.-])", copied), f"{target}: {path} not copied"
        users = [line.split()[1] for line in chain if line.upper().startswith("USER ")]
        assert users and users[-1] not in ("root", "0"), f"{target} runs as root"
    assert stages[next(iter(stages))][0].split()[1].startswith("python:3.11")


def test_every_api_launcher_keeps_idle_connections_longer_than_clients(services: dict) -> None:
    # uvicorn's default 5 s equals httpx's: under load the server closes a connection as a client reuses it.
    wanted = str(KEEP_ALIVE_SECONDS)
    assert _option(_api_server_command(services["api"]), "--timeout-keep-alive") == wanted
    cmd = next(line for line in _dockerfile_stages()["api"] if line.startswith("CMD "))
    assert _option(json.loads(cmd.removeprefix("CMD ")), "--timeout-keep-alive") == wanted
    assert _option(api_command("127.0.0.1", 8000), "--timeout-keep-alive") == wanted
    assert f"--timeout-keep-alive {wanted}" in (ROOT / "README.md").read_text()


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", ".normbench"):
        assert any(line.rstrip("/") == entry for line in ignored), entry


# --- docker-compose itself -----------------------------------------------------------------


@pytest.mark.system
def test_docker_compose_config_validates(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed; run `make deps` (it installs it) to validate docker-compose.yml")
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_PASSWORD", "COMPOSE_PROFILES")}

    def config(**extra: str) -> subprocess.CompletedProcess[str]:
        # An empty --env-file: a developer's own .env must not change what is checked.
        (tmp_path / "empty.env").touch()
        cmd = [binary, "-f", str(COMPOSE_FILE), "--env-file", str(tmp_path / "empty.env"), "config", "-q"]
        return subprocess.run(cmd, cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=60)

    result = config(POSTGRES_PASSWORD="test-secret")
    assert result.returncode == 0, result.stdout + result.stderr
    for profile in ("gpu", "cpu"):
        result = config(POSTGRES_PASSWORD="test-secret", COMPOSE_PROFILES=profile)
        assert result.returncode == 0, result.stdout + result.stderr
    # No password, no stack: compose refuses and says how to make one.
    result = config()
    assert result.returncode != 0 and "make-env.sh" in result.stderr, result.stderr


# --- issue 14 §3: a first start that is safe and says what it needs ---------------------------


def _makefile_torch_spec() -> str:
    match = re.search(r"^TORCH_SPEC \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    assert match, "no TORCH_SPEC in the Makefile"
    return match.group(1)


def test_worker_images_pin_the_makefiles_torch_and_say_which_driver(services: dict) -> None:
    pin = _makefile_torch_spec()
    assert re.fullmatch(r"torch==[\d.]+", pin), pin
    for name in ("worker", "worker-cpu"):
        assert services[name]["build"]["args"]["TORCH_SPEC"] == pin, name
    dockerfile = DOCKERFILE.read_text()
    assert f'ARG TORCH_SPEC="{pin}"' in dockerfile
    assert re.search(r"driver >= \d{3}", dockerfile), "the Dockerfile does not state the host driver the wheel needs"


def test_a_cpu_only_worker_profile(services: dict) -> None:
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert not (cpu.get("deploy") or {}).get("resources"), "the CPU worker must reserve no GPU"
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert cpu["image"] != gpu["image"]
    for key in ("command", "environment", "volumes", "depends_on", "healthcheck", "stop_grace_period"):
        assert cpu[key] == gpu[key], key
    assert "${TORCH_INDEX_URL:+--index-url" in DOCKERFILE.read_text()
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^COMPOSE_PROFILES=gpu$", example, flags=re.MULTILINE)


def test_worker_healthcheck_pings_itself_or_sees_its_live_lease(services: dict) -> None:
    for name in ("worker", "worker-cpu"):
        svc = services[name]
        assert _option(_command(svc), "--hostname") == "normbench@%h", name  # the name the script pings
        assert svc["healthcheck"]["test"] == ["CMD", "python", "scripts/worker_health.py"], name
    stages = _dockerfile_stages()
    worker = " ".join(_stage_chain(stages, "worker"))
    assert "COPY scripts/worker_health.py" in worker and "HEALTHCHECK" in worker and "/readyz" not in worker
    api = " ".join(_stage_chain(stages, "api"))
    assert "HEALTHCHECK" in api and ":8000/readyz" in api


def test_worker_health_script(tmp_path: Path) -> None:
    """Healthy while a run of this host has a live lease (the solo pool answers no ping while it trains), not once
    it lapses; with no lease and no broker answering, unhealthy."""
    from datetime import timedelta

    from fastapi.testclient import TestClient
    from sqlalchemy import update

    from app.db import session_factory
    from app.devserver import migrate
    from app.main import create_app
    from app.tables import Run
    from app.tables.base import utcnow

    spec = importlib.util.spec_from_file_location("worker_health", ROOT / "scripts" / "worker_health.py")
    assert spec and spec.loader
    health = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(health)

    settings = Settings(home=tmp_path / "home", broker_url="redis://127.0.0.1:9/0")
    settings.home.mkdir()
    migrate(settings.resolved_database_url)
    with TestClient(create_app(settings)) as client:
        body = {"dataset_id": "digits", "model": {"arch": "mlp"}, "variants": [{"norm": "bn"}], "batch_sizes": [8]}
        assert client.post("/v1/jobs", json=body).status_code == 202
    host = socket.gethostname()

    def lease(seconds: float) -> None:
        with session_factory(settings.resolved_database_url)() as session:
            expires = utcnow() + timedelta(seconds=seconds)
            session.execute(update(Run).values(status="running", worker=f"{host}:1", lease_expires_at=expires))
            session.commit()

    assert not health.training_with_a_live_lease(settings, host)
    lease(60)
    assert health.training_with_a_live_lease(settings, host)
    assert not health.training_with_a_live_lease(settings, "another-host")
    # As the container runs it: exit 0.
    env = {**os.environ, "NORMBENCH_HOME": str(settings.home), "NORMBENCH_BROKER_URL": "redis://127.0.0.1:9/0"}
    cmd = [sys.executable, str(ROOT / "scripts" / "worker_health.py")]
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=120).returncode == 0
    lease(-1)
    assert not health.training_with_a_live_lease(settings, host)
    assert not health.answers_ping(settings, host, timeout=1)  # nothing answers on a closed broker port


def test_postgres_password_comes_from_env_not_the_file(services: dict) -> None:
    raw = COMPOSE_FILE.read_text()
    assert "POSTGRES_PASSWORD: normbench" not in raw and "normbench:normbench@" not in raw
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    for name in ("migrate", "api", "worker"):
        url = services[name]["environment"]["NORMBENCH_DATABASE_URL"]
        assert ":${POSTGRES_PASSWORD:?" in url, name
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert ".env" in ignored and ".env" in (ROOT / ".dockerignore").read_text().split()


def test_make_env_writes_generated_secrets_once(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "make-env.sh", tmp_path / "scripts")
    shutil.copy(ROOT / ".env.example", tmp_path)
    script = ["bash", str(tmp_path / "scripts" / "make-env.sh")]
    first = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    env_file = tmp_path / ".env"
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")
    assert len(values["POSTGRES_PASSWORD"]) >= 24 and len(values["MINIO_ROOT_PASSWORD"]) >= 24
    assert values["POSTGRES_PASSWORD"] != values["MINIO_ROOT_PASSWORD"]
    assert env_file.stat().st_mode & 0o077 == 0, "the secrets file is readable by others"
    again = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    assert (
        dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line and line[0] != "#")[
            "POSTGRES_PASSWORD"
        ]
        == values["POSTGRES_PASSWORD"]
    )


def test_api_is_published_on_loopback_by_default(services: dict) -> None:
    ports = [str(p) for p in services["api"]["ports"]]
    assert ports and all(_interpolate(p).startswith("127.0.0.1:") for p in ports), ports
    assert all(p.startswith("${API_BIND_ADDRESS:-127.0.0.1}:") for p in ports), ports


def test_api_says_how_to_create_the_first_key_while_there_is_none(services: dict) -> None:
    script = _command(services["api"])[2]
    assert "normbench-admin list-keys" in script and "normbench-admin create-key --owner" in script
    assert script.strip().splitlines()[-1].strip().startswith("exec uvicorn")  # uvicorn is PID 1's successor
