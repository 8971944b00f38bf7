"""Reproducible runs and more seeds (issue 18 items 2 and 4): packs planned at submit, claimed whole, so a job
gives the same numbers whatever the scheduling; `POST /v1/jobs/{id}/extend` adds seeds to a job."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import select, update

from app.cli import build_parser
from app.config import Settings
from app.db import session_scope
from app.main import create_app
from app.repositories.runs import Claim, claim_pack
from app.tables import Run, utcnow
from tests.factories import FakeRun, finish_job, job_spec, wait_for_job
from tests.test_faults import Workers, workers  # noqa: F401  (the fixture)

LEASE = 30.0
TIMING = ("images_per_s", "step_time_ms", "wall_time_s")


def runs_of(settings: Settings, job_id: str) -> list[Run]:
    with session_scope(settings.resolved_database_url) as s:
        runs = list(s.scalars(select(Run).where(Run.job_id == job_id).order_by(Run.batch_size, Run.seed, Run.variant)))
        s.expunge_all()
    return runs


# -- packs planned at submit --------------------------------------------------------------------------


def test_packs_are_a_function_of_the_spec(client: TestClient, settings: Settings) -> None:
    variants = [{"norm": "bn"}, {"norm": "bn_precise", "precise_samples": 256}, {"norm": "gn", "groups": 4}]
    spec = job_spec("digits", model={"arch": "mlp"}, variants=variants, batch_sizes=[4, 8], seeds=[2, 0, 1])
    job = client.post("/v1/jobs", json={**spec, "pack_size": 4}).json()
    assert job["spec"]["pack_size"] == 4
    packs: dict[str, list[tuple[int, str, int]]] = {}
    for r in runs_of(settings, job["id"]):
        assert r.pack_key is not None
        packs.setdefault(r.pack_key, []).append((r.batch_size, r.variant, r.seed))
    # bn_precise trains as bn, so they share packs, seed by seed; gn(4) has its own; batch sizes never mix.
    expected_b4 = [
        [(4, "bn", 0), (4, "bn_precise(n=256)", 0), (4, "bn", 1), (4, "bn_precise(n=256)", 1)],
        [(4, "bn", 2), (4, "bn_precise(n=256)", 2)],
        [(4, "gn(4)", 0), (4, "gn(4)", 1), (4, "gn(4)", 2)],
    ]
    b4 = sorted(sorted(p) for p in packs.values() if p[0][0] == 4)
    assert b4 == sorted(sorted(p) for p in expected_b4)
    assert len(packs) == 6
    # The same spec gives the same packs, and the server's default is recorded when the spec has none.
    again = client.post("/v1/jobs", json={**spec, "pack_size": 4}).json()
    assert {r.pack_key for r in runs_of(settings, again["id"])} == set(packs)
    default = client.post("/v1/jobs", json=spec).json()
    assert default["spec"]["pack_size"] == settings.pack_size == 4


def race_claim(db: str, run: Run, worker: str, start: threading.Barrier, got: dict[str, list[Claim]]) -> None:
    with session_scope(db) as s:
        start.wait()
        got[worker] = claim_pack(s, run.id, worker, LEASE, 3)


def test_a_pack_is_claimed_whole_and_never_split(client: TestClient, settings: Settings) -> None:
    spec = job_spec("digits", model={"arch": "mlp"}, variants=[{"norm": "bn"}], batch_sizes=[8])
    job_id = client.post("/v1/jobs", json={**spec, "seeds": list(range(20)), "pack_size": 4}).json()["id"]
    runs = runs_of(settings, job_id)
    packs: dict[str, list[Run]] = {}
    for r in runs:
        packs.setdefault(str(r.pack_key), []).append(r)
    assert [len(p) for p in packs.values()] == [4] * 5
    db = settings.resolved_database_url
    for members in packs.values():  # two workers' tasks for two runs of one pack, at the same moment
        start = threading.Barrier(2)
        got: dict[str, list[Claim]] = {}
        threads = [threading.Thread(target=race_claim, args=(db, members[i], f"w{i}", start, got)) for i in (3, 0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sizes = sorted(len(c) for c in got.values())
        assert sizes == [0, 4], got
        winner = next(c for c in got.values() if c)
        assert [c.run_id for c in winner] == [r.id for r in sorted(members, key=lambda r: r.seed)]  # planned order
    # A lost worker's pack (leases expired) is taken over whole, by a task for any of its runs.
    members = next(iter(packs.values()))
    with session_scope(db) as s:
        s.execute(
            update(Run).where(Run.id.in_([r.id for r in members])).values(lease_expires_at=utcnow() - timedelta(1))
        )
        s.commit()
        taken = claim_pack(s, members[2].id, "w9", LEASE, 3)
    assert [c.attempt for c in taken] == [2, 2, 2, 2]


# -- extend -------------------------------------------------------------------------------------------


def test_extend_adds_seeds_with_new_packs(client: TestClient, settings: Settings) -> None:
    spec = job_spec("digits", model={"arch": "mlp"}, seeds=[0, 1, 2], pack_size=2)
    job = client.post("/v1/jobs", json=spec).json()
    before = runs_of(settings, job["id"])
    resp = client.post(f"/v1/jobs/{job['id']}/extend", json={"seeds": [7]})
    assert resp.status_code == 202, resp.text
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    extended = resp.json()
    assert extended["spec"]["seeds"] == [0, 1, 2, 7] and extended["progress"]["runs_total"] == 16
    assert {k: v for k, v in extended["spec"].items() if k != "seeds"} == {
        k: v for k, v in job["spec"].items() if k != "seeds"
    }
    assert extended["budget"] == job["budget"]
    after = runs_of(settings, job["id"])
    new = [r for r in after if r.seed == 7]
    assert len(new) == 4 and all(r.status == "queued" and r.published_at is not None for r in new)
    assert {r.pack_key for r in new}.isdisjoint({r.pack_key for r in before})  # a trained pack is not reopened
    assert {(r.id, r.pack_key) for r in before} <= {(r.id, r.pack_key) for r in after}
    # add_seeds picks the smallest seeds the job lacks
    assert client.post(f"/v1/jobs/{job['id']}/extend", json={"add_seeds": 2}).json()["spec"]["seeds"] == [
        0,
        1,
        2,
        7,
        3,
        4,
    ]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"seeds": [1, 5]}, 422, "already in the job"),
        ({"seeds": [5, 5]}, 422, "listed twice"),
        ({"seeds": [-1]}, 422, "seeds"),
        ({"seeds": [3], "add_seeds": 1}, 422, "exactly one"),
        ({}, 422, "exactly one"),
        ({"add_seeds": 0}, 422, "add_seeds"),
        ({"add_seeds": 3}, 422, "limit is 12"),  # 4 more runs per seed: 8 + 12 > 12
    ],
)
def test_extend_refuses(settings: Settings, body: dict[str, Any], status: int, words: str) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_runs_per_job": 12}))) as api:
        job_id = api.post("/v1/jobs", json=job_spec("digits", model={"arch": "mlp"}, seeds=[0, 1])).json()["id"]
        resp = api.post(f"/v1/jobs/{job_id}/extend", json=body)
        assert resp.status_code == status, resp.text
        assert words in resp.json()["detail"], resp.json()
        assert len(runs_of(settings, job_id)) == 8  # nothing added


def test_extend_another_owners_job_is_404_and_a_cancelled_one_409(settings: Settings) -> None:
    admin = {"Authorization": "Bearer test-admin-token-0123456789abcdef"}
    keyed = settings.model_copy(update={"require_api_keys": True, "admin_token": SecretStr(admin["Authorization"][7:])})
    with TestClient(create_app(keyed)) as api:
        alice, bob = (
            {
                "Authorization": "Bearer "
                + api.post("/v1/admin/keys", json={"owner": o, "name": o}, headers=admin).json()["token"]
            }
            for o in ("alice", "bob")
        )
        job_id = api.post("/v1/jobs", json=job_spec("digits", model={"arch": "mlp"}), headers=alice).json()["id"]
        assert api.post(f"/v1/jobs/{job_id}/extend", json={"add_seeds": 1}, headers=bob).status_code == 404
        api.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
        resp = api.post(f"/v1/jobs/{job_id}/extend", json={"add_seeds": 1}, headers=alice)
        assert resp.status_code == 409 and "retry" in resp.json()["detail"]
        assert api.post(f"/v1/jobs/{job_id}/retry", headers=alice).status_code == 202
        assert api.post(f"/v1/jobs/{job_id}/extend", json={"add_seeds": 1}, headers=alice).status_code == 202


# -- the report ---------------------------------------------------------------------------------------


def test_the_report_ignores_packing_and_lists_runs_trained_in_another_pack(
    client: TestClient, settings: Settings
) -> None:
    job_id = client.post("/v1/jobs", json=job_spec("digits", model={"arch": "mlp"}, seeds=[0, 1])).json()["id"]
    machine = {"torch": "2.x", "device": "cpu", "python": "3.11", "threads": 1, "precision": "fp32"}

    def fake(run: Run, position: int) -> FakeRun:
        alone = run.variant == "gn(4)" and run.batch_size == 8 and run.seed == 1  # requeued alone after a lost lease
        env = machine | {"engine": "pack", "pack_planned": 2, "pack_runs": 1 if alone else 2, "largest_group": 2}
        env |= {"resumed_from_step": 40} if alone else {}
        return FakeRun("succeeded", {"environment": env, "final_metrics": {"val_acc": 0.9}})

    finish_job(settings, job_id, fake)
    page = client.get(f"/v1/jobs/{job_id}/report").text
    assert "different environments" not in page  # only the packing differed
    assert "4 packs of 2 runs" in page
    assert "1 run trained in a different pack than planned" in page
    assert "gn(4) at batch 8, seed 1: trained in a pack of 1, planned 2" in page


# -- end to end: the same job with one and with two workers ------------------------------------------


def finals(client: TestClient, job_id: str) -> dict[tuple[str, int, int], dict[str, Any]]:
    out = {}
    for r in client.get(f"/v1/jobs/{job_id}/runs").json():
        assert r["status"] == "succeeded", r
        assert r["environment"]["pack_runs"] == r["environment"]["pack_planned"], r["environment"]
        out[(r["variant"], r["batch_size"], r["seed"])] = {
            k: v for k, v in r["final_metrics"].items() if k not in TIMING
        } | {"steps": r["steps_done"], "samples": r["samples_seen"]}
    return out


@pytest.mark.e2e
def test_one_worker_or_two_give_identical_runs_and_extend_adds_pairs(
    client: TestClient,
    workers: Workers,  # noqa: F811
) -> None:
    spec = job_spec(
        "digits",
        model={"arch": "mlp"},
        variants=[{"norm": "bn"}, {"norm": "gn", "groups": 16}],
        batch_sizes=[4, 8],
        seeds=[0, 1, 2],
        budget={"epochs": 1},
        log_every_steps=20,
        pack_size=2,  # packs of seeds 0–1 and of seed 2: eight packs, for two workers to share
    )
    workers.start("one")
    first = client.post("/v1/jobs", json=spec).json()["id"]
    assert wait_for_job(client, first, timeout=300)["status"] == "succeeded"
    workers.start("two")
    second = client.post("/v1/jobs", json=spec).json()["id"]
    assert wait_for_job(client, second, timeout=300)["status"] == "succeeded"
    runs = client.get(f"/v1/jobs/{second}/runs").json()
    assert len({r["worker"] for r in runs}) == 2  # both workers trained some of its packs
    assert finals(client, first) == finals(client, second)  # exact: the packs, not the scheduling, decide
    assert "different environments" not in client.get(f"/v1/jobs/{second}/report").text

    # More seeds for an inconclusive comparison: the new runs train, and the comparisons pair them too.
    resp = client.post(f"/v1/jobs/{second}/extend", json={"add_seeds": 1})
    assert resp.status_code == 202, resp.text
    assert wait_for_job(client, second, timeout=300)["status"] == "succeeded"
    results = client.get(f"/v1/jobs/{second}/results").json()
    assert {r["seed"] for r in results["runs"]} == {0, 1, 2, 3}
    assert all(c["n"] == 4 for c in results["cells"])
    for c in results["comparisons"]:
        assert c["n_pairs"] == 4 and c["seeds"] == [0, 1, 2, 3]
    after = finals(client, second)
    assert {k: v for k, v in after.items() if k[2] != 3} == finals(client, first)  # the old runs are untouched


def test_the_cli_extend_argument() -> None:
    parse = build_parser().parse_args
    assert parse(["extend", "JOB", "--seeds", "2"]).seeds == {"add_seeds": 2}
    assert parse(["extend", "JOB", "--seeds", "5,6"]).seeds == {"seeds": [5, 6]}
    with pytest.raises(SystemExit):
        parse(["extend", "JOB", "--seeds", "two"])
