"""Object storage against a real S3-compatible server: moto's standalone server, started here as a process on
127.0.0.1 (as s3fs's own tests do). Round trips, streaming in bounded memory, the API on S3, the worker's
dataset cache, and a run killed on one worker resuming on another that shares nothing but the bucket."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.config import Settings
from app.main import create_app
from app.storage import CHUNK_BYTES, DatasetCache, LocalStorage, S3Storage, local_copy, settings_storage
from tests.factories import image_npz, upload, wait_for_job
from tests.support import WorkerProcess, wait_until, worker_env
from tests.test_faults import slow_spec

KEY, SECRET, REGION = "testing", "testing-secret", "eu-west-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server process for this test session; its endpoint URL."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto server exited with {proc.returncode}"
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "moto server did not start in 60 s"
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def s3_storage(endpoint: str, url: str) -> S3Storage:
    return S3Storage(url, endpoint_url=endpoint, region=REGION, access_key_id=KEY, secret_access_key=SECRET)


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket; its name."""
    name = f"nb-{uuid.uuid4().hex[:12]}"
    s3_storage(s3_endpoint, f"s3://{name}").fs.mkdir(name)
    return name


@pytest.fixture
def store(s3_endpoint: str, bucket: str) -> S3Storage:
    return s3_storage(s3_endpoint, f"s3://{bucket}/some/prefix")


def objects(store: S3Storage) -> list[str]:
    """Every key in the storage's bucket."""
    return sorted(p.removeprefix(store.bucket + "/") for p in store.fs.find(store.bucket))


def write_file(path: Path, size: int, seed: int = 0) -> str:
    """A file of `size` bytes that do not compress, written in 1 MiB pieces; its sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * (2**20 // 32)
    with path.open("wb") as f:
        for i in range(0, size, len(block)):
            piece = (i.to_bytes(8, "little") + block)[: min(len(block), size - i)]
            f.write(piece)
            digest.update(piece)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


# --- the storage itself ---------------------------------------------------------------------


def test_put_download_delete_round_trip(store: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"normbench" * 1000)
    uri = store.put_file("datasets/ds1.npz", src)
    assert uri == f"s3://{store.bucket}/some/prefix/datasets/ds1.npz"
    assert objects(store) == ["some/prefix/datasets/ds1.npz"]
    assert store.exists(uri) and store.local_path(uri) is None
    target = tmp_path / "out" / "copy.bin"
    store.download(uri, target)
    assert target.read_bytes() == src.read_bytes()
    with local_copy(store, uri) as path:
        assert path.read_bytes() == src.read_bytes()
    assert not path.exists()  # the temporary download went with the block
    store.delete(uri)
    assert not store.exists(uri) and objects(store) == []
    store.delete(uri)  # a missing object is no error
    with pytest.raises(FileNotFoundError):
        store.download(uri, tmp_path / "gone.bin")
    assert list(tmp_path.glob("*.part")) == [] and not (tmp_path / "gone.bin").exists()


def test_uris_outside_the_storage_and_bad_keys_are_refused(store: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    for key in ("../escape.bin", "a/../../b", "", "/"):
        with pytest.raises(ValueError):
            store.put_file(key, src)
    for uri in ("s3://other-bucket/some/prefix/x", f"s3://{store.bucket}/elsewhere/x", "file:///etc/passwd"):
        assert not store.exists(uri)  # written under another storage URL: gone as far as this one knows
        with pytest.raises(ValueError):
            store.delete(uri)
        with pytest.raises(ValueError):
            store.download(uri, tmp_path / "x")


def test_a_large_object_streams_in_bounded_memory(store: S3Storage, tmp_path: Path) -> None:
    size = 64 * 2**20
    src = tmp_path / "big.bin"
    digest = write_file(src, size)
    target = tmp_path / "back.bin"
    tracemalloc.start()
    try:
        uri = store.put_file("checkpoints/r1/big.pt", src)
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        store.download(uri, target)
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sha256_of(target) == digest
    # One part of CHUNK_BYTES in flight, copied once by the HTTP stack; downloads in small reads: far below 64 MiB.
    assert upload_peak < 3 * CHUNK_BYTES, upload_peak
    assert download_peak < CHUNK_BYTES, download_peak
    assert store.fs.info(store._object(uri))["size"] == size


def test_open_storage_from_settings(s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        storage_url=f"s3://{bucket}/nb",
        s3_endpoint_url=s3_endpoint,
        s3_region=REGION,
        s3_access_key_id=KEY,
        s3_secret_access_key=SecretStr(SECRET),
    )
    storage = settings_storage(settings)
    assert isinstance(storage, S3Storage) and storage.base == f"{bucket}/nb"
    src = tmp_path / "a"
    src.write_bytes(b"a")
    assert storage.exists(storage.put_file("k", src))
    assert isinstance(settings_storage(Settings(home=tmp_path)), LocalStorage)


# --- the worker's dataset cache -------------------------------------------------------------


def test_dataset_cache_by_content_hash_with_lru_eviction(store: S3Storage, tmp_path: Path) -> None:
    size = 3 * 2**20
    blobs = {}
    for name in ("a", "b", "c"):
        src = tmp_path / f"{name}.npz"
        sha = write_file(src, size, seed=ord(name))
        blobs[name] = (store.put_file(f"datasets/{name}.npz", src), sha)
    cache = DatasetCache(tmp_path / "cache", max_bytes=2 * size, keep_recent_seconds=0)

    def cached() -> list[str]:
        return [p.name for p in cache.entries()]

    path_a = cache.path(store, *blobs["a"])
    assert path_a == tmp_path / "cache" / f"{blobs['a'][1]}.npz" and sha256_of(path_a) == blobs["a"][1]
    cache.path(store, *blobs["b"])
    store.delete(blobs["a"][0])
    assert cache.path(store, *blobs["a"]) == path_a  # a hit: served from the cache, not storage
    assert cached() == [f"{blobs['b'][1]}.npz", f"{blobs['a'][1]}.npz"]  # b is now the least recently used
    cache.path(store, *blobs["c"])
    assert cached() == [f"{blobs['a'][1]}.npz", f"{blobs['c'][1]}.npz"]  # b evicted, the limit held
    assert sum(p.stat().st_size for p in cache.entries()) <= cache.max_bytes
    assert sorted(p.name for p in cache.root.iterdir()) == sorted([".lock", *cached()])  # no partial files


def test_dataset_cache_refuses_a_blob_that_does_not_match_its_hash(store: S3Storage, tmp_path: Path) -> None:
    src = tmp_path / "a.npz"
    write_file(src, 1000)
    uri = store.put_file("datasets/a.npz", src)
    cache = DatasetCache(tmp_path / "cache", max_bytes=2**30)
    with pytest.raises(ValueError, match="does not match its sha256"):
        cache.path(store, uri, "0" * 64)
    assert cache.entries() == [] and list(cache.root.glob(".*.part")) == []


def test_dataset_cache_keeps_entries_in_use_and_skips_local_storage(store: S3Storage, tmp_path: Path) -> None:
    blobs = []
    for seed in range(2):
        src = tmp_path / f"{seed}.npz"
        sha = write_file(src, 2**20, seed=seed)
        blobs.append((store.put_file(f"datasets/{seed}.npz", src), sha))
    cache = DatasetCache(tmp_path / "cache", max_bytes=2**20)  # room for one; both used within the minute
    for uri, sha in blobs:
        cache.path(store, uri, sha)
    assert len(cache.entries()) == 2  # over the limit for now, rather than delete what another process opens

    local = LocalStorage(tmp_path / "files")
    src = tmp_path / "l.npz"
    src.write_bytes(b"l")
    uri = local.put_file("datasets/l.npz", src)
    local_cache = DatasetCache(tmp_path / "local-cache", max_bytes=0)
    assert local_cache.path(local, uri, hashlib.sha256(b"l").hexdigest()) == local.local_path(uri)
    assert not local_cache.root.exists()  # a local file is used where it is, never copied


# --- the API and workers on S3 ----------------------------------------------------------------


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str, bucket: str) -> Settings:
    return settings.model_copy(
        update={
            "storage_url": f"s3://{bucket}/normbench",
            "s3_endpoint_url": s3_endpoint,
            "s3_region": REGION,
            "s3_access_key_id": KEY,
            "s3_secret_access_key": SecretStr(SECRET),
        }
    )


def test_the_api_stores_datasets_in_the_bucket(s3_settings: Settings, tmp_path: Path) -> None:
    store = settings_storage(s3_settings)
    assert isinstance(store, S3Storage)
    with TestClient(create_app(s3_settings)) as client:
        assert objects(store) == ["normbench/datasets/digits.npz"]  # the built-in set, registered at start-up
        resp = upload(client, "bars.npz", image_npz(), name="bars")
        assert resp.status_code == 201, resp.text
        ds = resp.json()
        key = f"normbench/datasets/{ds['id']}.npz"
        assert key in objects(store)
        back = tmp_path / "back.npz"
        store.download(f"s3://{store.bucket}/{key}", back)
        assert sha256_of(back) == ds["sha256"] and back.stat().st_size == ds["size_bytes"]
        assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
        assert key not in objects(store)
    assert not (s3_settings.home / "storage").exists()  # nothing went to local file storage


@pytest.mark.e2e
def test_a_run_killed_on_one_worker_resumes_on_another_from_the_bucket(s3_settings: Settings, tmp_path: Path) -> None:
    """Two workers with their own NORMBENCH_HOME and cache and no shared directory: the checkpoint the first
    wrote to the bucket is what the second resumes from, and each downloads the dataset into its own cache."""
    epochs = 4
    secret = s3_settings.s3_secret_access_key
    assert secret is not None

    def start(name: str) -> WorkerProcess:
        env = worker_env(
            NORMBENCH_DATABASE_URL=s3_settings.resolved_database_url,
            NORMBENCH_BROKER_URL=s3_settings.resolved_broker_url,
            NORMBENCH_BROKER_KEY_PREFIX=s3_settings.broker_key_prefix,
            NORMBENCH_STORAGE_URL=s3_settings.resolved_storage_url,
            NORMBENCH_S3_ENDPOINT_URL=str(s3_settings.s3_endpoint_url),
            NORMBENCH_S3_REGION=REGION,
            NORMBENCH_S3_ACCESS_KEY_ID=KEY,
            NORMBENCH_S3_SECRET_ACCESS_KEY=secret.get_secret_value(),
            NORMBENCH_HOME=str(tmp_path / name / "home"),
            NORMBENCH_CACHE_DIR=str(tmp_path / name / "cache"),
            NORMBENCH_LEASE_SECONDS="3",
            NORMBENCH_HEARTBEAT_SECONDS="0.5",
            NORMBENCH_RECONCILE_SECONDS="0.5",
            NORMBENCH_REPUBLISH_AFTER_SECONDS="3",
        )
        (tmp_path / name).mkdir(exist_ok=True)
        w = WorkerProcess(env, tmp_path / name / "worker.log")
        w.wait_ready()
        return w

    store = settings_storage(s3_settings)
    assert isinstance(store, S3Storage)
    started: list[WorkerProcess] = []
    try:
        with TestClient(create_app(s3_settings)) as client:
            started.append(start("a"))
            spec = slow_spec(budget={"epochs": epochs}, log_every_steps=20)
            job_id = client.post("/v1/jobs", json=spec).json()["id"]
            run_id = client.get(f"/v1/jobs/{job_id}/runs").json()[0]["id"]

            def run() -> dict[str, Any]:
                return client.get(f"/v1/runs/{run_id}").json()  # type: ignore[no-any-return]

            wait_until(lambda: run()["epochs_done"] >= 1, 90, "epoch 1 on worker a")
            assert any(k.startswith(f"normbench/checkpoints/{run_id}/") for k in objects(store))
            started[0].proc.kill()  # SIGKILL during epoch 2
            started[0].proc.wait()
            started.append(start("b"))
            job = wait_for_job(client, job_id, timeout=180)
            final = run()
    finally:
        for w in started:
            w.stop()
    assert job["status"] == "succeeded" and final["status"] == "succeeded", (job, final)
    assert final["attempt"] == 2
    assert final["environment"]["resumed_from_step"] == final["steps_done"] // epochs  # epoch 1's checkpoint
    hashes = set()
    for name in ("a", "b"):
        cached = list((tmp_path / name / "cache").glob("*.npz"))
        assert len(cached) == 1, (name, cached)  # each worker downloaded the dataset into its own cache
        hashes.add(cached[0].name)
        assert cached[0].name == f"{sha256_of(cached[0])}.npz"
        assert not (tmp_path / name / "home" / "storage").exists()  # no local file storage on either
    assert len(hashes) == 1
