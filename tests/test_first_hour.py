"""Issue 14 §3, the API and CLI items: timezone-aware timestamps, the report link, job-ID prefixes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app import cli
from app.config import Settings
from app.devserver import migrate
from app.main import create_app
from app.schemas.jobs import JobOut
from app.tables.base import UtcDateTime, as_utc

ADMIN = "admin-token-for-tests"
SPEC = {"dataset_id": "digits", "model": {"arch": "mlp"}, "variants": [{"norm": "bn"}], "batch_sizes": [8]}


@pytest.fixture
def sqlite_client(tmp_path: Path) -> Iterator[TestClient]:
    """The embedded default (SQLite keeps no time zone, the case that showed naive times)."""
    settings = Settings(home=tmp_path / "home", admin_token=ADMIN)
    settings.home.mkdir(parents=True)
    migrate(settings.resolved_database_url)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def pg_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"admin_token": SecretStr(ADMIN)}))) as c:
        yield c


def assert_utc(text: str | None, what: str) -> None:
    assert text is not None, what
    assert text.endswith("Z") or text.endswith("+00:00"), f"{what}: {text!r} has no UTC offset"
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() == timedelta(0), what
    assert abs(datetime.now(UTC) - parsed) < timedelta(hours=1), f"{what}: {text} is not now in UTC"


# pg_client is taken by name inside the test, where the conftest cannot see that it reaches Postgres: marked here.
@pytest.mark.parametrize("name", ["sqlite_client", pytest.param("pg_client", marks=pytest.mark.services)])
def test_every_timestamp_in_api_responses_is_utc_with_its_offset(name: str, request: pytest.FixtureRequest) -> None:
    client: TestClient = request.getfixturevalue(name)
    job = client.post("/v1/jobs", json=SPEC).json()
    assert_utc(job["created_at"], "POST /v1/jobs created_at")
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert_utc(job["created_at"], "GET /v1/jobs/{id} created_at")
    assert_utc(client.get("/v1/jobs").json()["items"][0]["created_at"], "GET /v1/jobs created_at")
    run = client.get(f"/v1/jobs/{job['id']}/runs").json()[0]
    assert_utc(run["created_at"], "run created_at")
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert_utc(cancelled["finished_at"], "finished_at of a cancelled job")
    run = client.get(f"/v1/runs/{run['id']}").json()
    assert_utc(run["finished_at"], "run finished_at")
    key = client.post("/v1/admin/keys", json={"owner": "alice"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert key.status_code == 201, key.text
    assert_utc(key.json()["created_at"], "key created_at")
    # And the OpenAPI document says so.
    schema = client.get("/openapi.json").json()["components"]["schemas"]["JobOut"]["properties"]["created_at"]
    assert schema.get("format") == "date-time"


def test_job_links_include_the_report(sqlite_client: TestClient) -> None:
    job = sqlite_client.post("/v1/jobs", json=SPEC).json()
    link = job["links"]["report"]
    assert link == f"/v1/jobs/{job['id']}/report"
    assert sqlite_client.get(link).status_code == 200


def test_utc_column_type_and_schema_normalise_naive_and_offset_times() -> None:
    naive = datetime(2026, 1, 2, 3, 4, 5)
    paris = datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1)))
    want = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert as_utc(naive) == want and as_utc(paris) == want and as_utc(paris).tzinfo is UTC
    assert UtcDateTime().process_result_value(naive, None) == want  # type: ignore[arg-type]
    assert JobOut.model_fields["created_at"].metadata  # the UtcTimestamp validator is attached


# ------------------------------------------------------------------------------------ CLI prefixes


class FakeApi:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids
        self.calls = 0

    def json(self, method: str, path: str, **_: Any) -> Any:
        assert (method, path) == ("GET", "/v1/jobs")
        self.calls += 1
        return {"items": [{"id": i} for i in self.ids]}


def test_a_unique_job_id_prefix_resolves_to_the_job() -> None:
    api = FakeApi(["be5c4111ae0649d1bb200be110edf014", "a15a0ce8caae4e39aff8d0502027d218"])
    assert cli.resolve_job(api, "be5c") == "be5c4111ae0649d1bb200be110edf014"  # type: ignore[arg-type]
    assert cli.resolve_job(api, "A15A0") == "a15a0ce8caae4e39aff8d0502027d218"  # type: ignore[arg-type]


def test_an_ambiguous_prefix_is_a_clear_error() -> None:
    api = FakeApi(["abc1000000000000000000000000000a", "abc2000000000000000000000000000b"])
    with pytest.raises(cli.CliError, match=r"'abc' is the start of 2 of your jobs .*give more characters"):
        cli.resolve_job(api, "abc")  # type: ignore[arg-type]


def test_full_ids_and_non_hex_names_go_to_the_server_unchanged() -> None:
    api = FakeApi(["abc1000000000000000000000000000a"])
    full = "ffff1000000000000000000000000000"
    assert cli.resolve_job(api, full) == full  # type: ignore[arg-type]
    assert cli.resolve_job(api, "nope") == "nope"  # type: ignore[arg-type]
    assert cli.resolve_job(api, "dead") == "dead"  # type: ignore[arg-type]  # no match: the server's 404 explains
    assert api.calls == 1


def test_every_job_command_resolves_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "resolve_job", lambda api, ref: "f" * 32 if ref == "ab" else ref)
    called: list[str] = []
    for name in ("cmd_status", "cmd_results", "cmd_report", "cmd_cancel", "cmd_retry", "cmd_jobs", "cmd_extend"):
        monkeypatch.setattr(cli, name, lambda api, args: called.append(args.job) or 0)
    for argv in (["status", "ab"], ["results", "ab"], ["report", "ab"], ["cancel", "ab"], ["retry", "ab"],
                 ["jobs", "rm", "ab"], ["extend", "ab", "--seeds", "1"]):  # fmt: skip
        assert cli.main(argv) == 0, argv
    assert called == ["f" * 32] * 7
