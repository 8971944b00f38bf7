"""Results, curves and exports over HTTP against the real Postgres, with finished training simulated
by writing run rows and metric points directly (no worker)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy import stats
from sqlalchemy import select
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from app.config import Settings
from app.db import session_factory
from app.services import statistics as st
from app.tables import MetricPoint, Run
from tests.factories import FakeRun, finish_job, job_spec
from tests.test_statistics import holm_by_hand

EPOCHS = 3
SEEDS = [0, 1, 2]
# final val_acc per (variant, batch size) and seed; None = diverged
FINAL: dict[tuple[str, int], list[float | None]] = {
    ("bn", 2): [0.80, 0.78, 0.83],
    ("gn(4)", 2): [0.97, 0.96, 0.975],
    ("bn", 8): [0.980, 0.975, 0.982],
    ("gn(4)", 8): [0.975, 0.979, 0.978],
    ("bn", 32): [None, None, 0.98],
    ("gn(4)", 32): [0.97, 0.98, 0.975],
}
STEP_POINTS = 1000  # train_loss_step points of the STEP_RUN
STEP_RUN = ("gn(4)", 2, 0)


def epoch_curve(final: float) -> list[float]:
    """Per-epoch val_acc with a peak at epoch 2 above the final value."""
    return [final - 0.05, final + 0.01, final]


def finish_runs(settings: Settings, job_id: str, leave_running: int = 0) -> dict[tuple[str, int, int], str]:
    """Write what training would have written; returns run ids by (variant, batch size, seed)."""

    def fake(run: Run, position: int) -> FakeRun:
        made = outcome(run, running=position < leave_running)
        if (run.variant, run.batch_size, run.seed) == STEP_RUN:
            losses = [2.0 - i / STEP_POINTS for i in range(STEP_POINTS)]
            losses[400] = 9.0  # a spike a downsampler must keep
            losses[700] = -1.0
            made.points += [("train_loss_step", i + 1, (i + 1) / 10, v) for i, v in enumerate(losses)]
        return made

    return finish_job(settings, job_id, fake)


def outcome(run: Run, running: bool) -> FakeRun:
    final = FINAL[(run.variant, run.batch_size)][run.seed]
    steps = EPOCHS * (1600 // run.batch_size)
    per_epoch = steps // EPOCHS
    if running:
        return FakeRun("running", {"steps_done": per_epoch}).per_epoch("val_acc", per_epoch, [0.5])
    if final is None:
        error = "training loss became non-finite at step 900 (epoch 2)"
        return (
            FakeRun("diverged", {"error": error, "steps_done": per_epoch + 5})
            .per_epoch("val_acc", per_epoch, [0.3])
            .per_epoch("val_loss", per_epoch, [2.0, float("inf")])
        )
    columns = {
        "steps_done": steps,
        "samples_seen": steps * run.batch_size,
        "epochs_done": EPOCHS,
        "final_metrics": {"val_acc": final, "val_loss": 1 - final, "train_loss": 0.1, "images_per_s": 100.0},
    }
    return (
        FakeRun("succeeded", columns)
        .per_epoch("val_acc", per_epoch, epoch_curve(final))
        .per_epoch("val_loss", per_epoch, [1.2 - final, 0.9 - final, 1 - final])
    )


@pytest.fixture
def finished_job(client: TestClient, settings: Settings) -> tuple[str, dict[tuple[str, int, int], str]]:
    resp = client.post("/v1/jobs", json=job_spec("digits", batch_sizes=[2, 8, 32], seeds=SEEDS))
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    return job_id, finish_runs(settings, job_id)


def points(accs: list[float | None]) -> dict[int, float]:
    return {seed: 100 * a for seed, a in enumerate(accs) if a is not None}


def test_results_cells_comparisons_holm_and_verdicts(
    client: TestClient, finished_job: tuple[str, dict[tuple[str, int, int], str]]
) -> None:
    job_id, _ = finished_job
    body = client.get(f"/v1/jobs/{job_id}/results").json()
    assert body["complete"] is True and body["baseline"] == "bn"
    assert body["variants"] == ["bn", "gn(4)"] and body["batch_sizes"] == [2, 8, 32]
    assert any("2 run(s) diverged" in n for n in body["notes"])

    cells = {(c["variant"], c["batch_size"]): c for c in body["cells"]}
    gn2 = cells[("gn(4)", 2)]
    accs = FINAL[("gn(4)", 2)]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(accs), scale=stats.sem(accs))
    assert gn2["n"] == 3 and gn2["diverged"] == 0 and gn2["pending"] == 0
    assert gn2["val_acc"]["mean"] == pytest.approx(np.mean(accs))
    assert gn2["val_acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert (gn2["val_acc"]["ci95_low"], gn2["val_acc"]["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    best = [max(epoch_curve(a)) for a in accs]  # per seed, the best epoch
    assert gn2["best_val_acc"]["mean"] == pytest.approx(np.mean(best)) and gn2["best_val_acc"]["n"] == 3
    assert gn2["best_val_loss"]["mean"] == pytest.approx(np.mean([0.9 - a for a in accs]))
    bn32 = cells[("bn", 32)]
    assert (bn32["n"], bn32["n_total"], bn32["diverged"]) == (1, 3, 2)
    assert bn32["val_acc"]["mean"] == pytest.approx(0.98) and bn32["val_acc"]["ci95_low"] is None
    diverged = [r for r in body["runs"] if r["status"] == "diverged"]
    assert len(diverged) == 2 and all(r["val_acc"] is None and r["best_val_loss"] == 2.0 for r in diverged)

    cmp = {c["batch_size"]: c for c in body["comparisons"]}
    assert set(cmp) == {2, 8, 32} and all(c["variant"] == "gn(4)" and c["baseline"] == "bn" for c in cmp.values())
    raw, tost = {}, {}
    for b in (2, 8):
        gn, bn = points(FINAL[("gn(4)", b)]), points(FINAL[("bn", b)])
        ref = stats.ttest_rel(list(gn.values()), list(bn.values()))
        ci = ref.confidence_interval(0.95)
        c = cmp[b]
        assert c["n_pairs"] == 3 and c["seeds"] == SEEDS
        assert c["diff_points"] == pytest.approx(np.mean([gn[s] - bn[s] for s in SEEDS]))
        assert c["p_value"] == pytest.approx(ref.pvalue) and c["t"] == pytest.approx(ref.statistic)
        assert (c["ci95_low_points"], c["ci95_high_points"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        raw[b] = ref.pvalue
        tost[b] = ttost_paired(np.array(list(gn.values())), np.array(list(bn.values())), -1.0, 1.0)[0]
        assert c["p_equivalence"] == pytest.approx(tost[b]) and c["equivalence_margin_points"] == 1.0
    # one family: the difference and the equivalence test of both testable comparisons, at most 2 true
    adjusted = holm_by_hand([raw[2], raw[8], tost[2], tost[8]], max_true=2)
    assert [cmp[2]["p_holm"], cmp[8]["p_holm"]] == pytest.approx(adjusted[:2])
    assert [cmp[2]["p_equivalence_holm"], cmp[8]["p_equivalence_holm"]] == pytest.approx(adjusted[2:])
    assert cmp[2]["significant"] and (cmp[2]["verdict"], cmp[2]["outcome"]) == ("different", "better")
    assert cmp[2]["ci_low_points"] > 0 and cmp[2]["min_detectable_points"] is None
    c8 = cmp[8]
    assert not c8["significant"] and (c8["verdict"], c8["outcome"]) == ("inconclusive", "inconclusive")
    assert c8["ci_level"] == pytest.approx(1 - 0.05 / 2) and c8["alpha_adjusted"] == pytest.approx(0.025)
    assert c8["ci_low_points"] < 0 < c8["ci_high_points"]
    sd = np.std([gn - bn for gn, bn in zip(FINAL[("gn(4)", 8)], FINAL[("bn", 8)], strict=True)], ddof=1) * 100
    assert c8["std_points"] == pytest.approx(sd)
    n_needed = math.ceil(TTestPower().solve_power(1.0 / sd, nobs=None, alpha=0.025, power=0.8))
    assert c8["seeds_needed"] == n_needed and c8["min_detectable_points"] > 1.0
    c32 = cmp[32]
    assert (c32["n_pairs"], c32["p_value"], c32["p_holm"], c32["outcome"]) == (1, None, None, "too_few")
    assert c32["verdict"] == "inconclusive" and c32["baseline_diverged"] == 2 and c32["note"]

    verdicts = body["verdicts"]
    assert any(v.startswith("At batch 2, gn(4) beats bn by 16.5 points (adjusted 97.5% CI") for v in verdicts), verdicts
    assert any(
        v.startswith("At batch 8, gn(4) vs bn is inconclusive: difference -0.2 points, adjusted 97.5% CI ")
        and f"~{n_needed} seeds would be needed to detect a 1.0-point difference" in v
        for v in verdicts
    ), verdicts
    assert any(v.startswith("bn diverged in 2 of 3 seeds at batch 32") for v in verdicts)
    assert any(v.startswith("At batch 32, gn(4) vs bn is inconclusive: not enough seeds (1 seed") for v in verdicts)
    assert not any("trails" in v or "indistinguishable" in v for v in verdicts)
    assert body["equivalence_margin_points"] == 1.0 and len(body["how_to_read"]) >= 3
    assert body["how_to_read"][0].startswith("± after a mean is the half-width of its 95% interval")

    # bn's 98.0 at batch 32 is one surviving seed: its reference is batch 8 (3 seeds), and the drop is paired
    sens = {(s["variant"], s["batch_size"]): s for s in body["sensitivity"]}
    assert set(sens) == {("bn", 2), ("gn(4)", 2)}
    assert all(s["best_batch_size"] == 8 and s["n_pairs"] == 3 for s in sens.values())
    drops = {
        v: stats.ttest_rel(list(points(FINAL[(v, 8)]).values()), list(points(FINAL[(v, 2)]).values()))
        for v in ("bn", "gn(4)")
    }
    bn_drop = sens[("bn", 2)]
    assert bn_drop["drop_points"] == pytest.approx(np.mean([18.0, 19.5, 15.2]))
    assert bn_drop["p_value"] == pytest.approx(drops["bn"].pvalue)
    drop_tost = [
        ttost_paired(
            np.array(list(points(FINAL[(v, 8)]).values())), np.array(list(points(FINAL[(v, 2)]).values())), -1.0, 1.0
        )[0]
        for v in ("bn", "gn(4)")
    ]
    adjusted = holm_by_hand([drops["bn"].pvalue, drops["gn(4)"].pvalue, *drop_tost], max_true=2)
    assert [bn_drop["p_holm"], sens[("gn(4)", 2)]["p_holm"]] == pytest.approx(adjusted[:2])
    assert bn_drop["significant"] and not sens[("gn(4)", 2)]["significant"]
    assert (bn_drop["verdict"], sens[("gn(4)", 2)]["verdict"]) == ("different", "inconclusive")
    assert any(v.startswith("bn loses 17.6 points going from batch 8 to batch 2 (adjusted 97.5% CI") for v in verdicts)
    assert any(
        v.startswith(
            "gn(4)'s drop from its best batch size 8 to batch 2 is inconclusive: neither a drop nor equivalence"
        )
        for v in verdicts
    ), verdicts


def test_baseline_selection_and_unknown_baseline(
    client: TestClient, finished_job: tuple[str, dict[tuple[str, int, int], str]]
) -> None:
    job_id, _ = finished_job
    body = client.get(f"/v1/jobs/{job_id}/results", params={"baseline": "gn(4)"}).json()
    assert body["baseline"] == "gn(4)"
    c2 = next(c for c in body["comparisons"] if c["batch_size"] == 2)
    assert c2["variant"] == "bn" and c2["outcome"] == "worse" and c2["diff_points"] < 0
    assert c2["verdict"] == "different"
    assert any(v.startswith("At batch 2, bn trails gn(4) by 16.5 points") for v in body["verdicts"])
    resp = client.get(f"/v1/jobs/{job_id}/results", params={"baseline": "batchnorm"})
    assert resp.status_code == 422
    assert resp.json()["error"] == "invalid_request"
    assert "'batchnorm'" in resp.json()["detail"] and "bn, gn(4)" in resp.json()["detail"]


def test_partial_results_are_marked(client: TestClient, settings: Settings) -> None:
    job_id = client.post("/v1/jobs", json=job_spec("digits", batch_sizes=[2, 8, 32], seeds=SEEDS)).json()["id"]
    finish_runs(settings, job_id, leave_running=2)
    body = client.get(f"/v1/jobs/{job_id}/results").json()
    assert body["complete"] is False and body["notes"][0].startswith("partial: 2 of 18 runs")
    assert body["verdicts"][0].startswith("Partial results (16 of 18 runs finished)")
    cell = next(c for c in body["cells"] if c["variant"] == "bn" and c["batch_size"] == 2)
    assert (cell["n"], cell["pending"]) == (1, 2)
    running = [r for r in body["runs"] if r["status"] == "running"]
    assert len(running) == 2 and all(r["best_val_acc"] == 0.5 for r in running)
    cmp = next(c for c in body["comparisons"] if c["batch_size"] == 2)
    assert cmp["n_pairs"] == 1 and cmp["outcome"] == "too_few"


def test_curves_downsampling_and_paging(
    client: TestClient, finished_job: tuple[str, dict[tuple[str, int, int], str]]
) -> None:
    job_id, ids = finished_job
    url = f"/v1/jobs/{job_id}/curves"
    default = client.get(url, params={"metric": "train_loss_step"}).json()
    (series,) = default["series"]
    assert default["max_points"] == 500 and series["total_points"] == STEP_POINTS
    steps = [p["step"] for p in series["points"]]
    assert len(steps) == 500 and steps[0] == 1 and steps[-1] == STEP_POINTS and 401 in steps and 701 in steps
    values = [p["value"] for p in series["points"]]
    assert max(values) == 9.0 and min(values) == -1.0
    few = client.get(url, params={"metric": "train_loss_step", "max_points": 5}).json()["series"][0]
    assert [p["step"] for p in few["points"]][0::4] == [1, STEP_POINTS] and len(few["points"]) == 5
    for params in ({"max_points": 0}, {"full": "true"}):
        full = client.get(url, params={"metric": "train_loss_step", **params}).json()
        assert full["max_points"] is None and len(full["series"][0]["points"]) == STEP_POINTS
    page = client.get(url, params={"metric": "train_loss_step", "offset": 100, "limit": 50, "full": "true"}).json()
    s = page["series"][0]
    assert [p["step"] for p in s["points"]] == list(range(101, 151))
    assert (s["window_points"], s["next_offset"], page["offset"], page["limit"]) == (50, 150, 100, 50)
    last = client.get(url, params={"metric": "train_loss_step", "offset": 980, "limit": 50}).json()["series"][0]
    assert len(last["points"]) == 20 and last["next_offset"] is None
    one = client.get(url, params={"metric": "val_acc", "run_id": ids[("bn", 8, 1)]}).json()["series"]
    assert len(one) == 1 and [p["value"] for p in one[0]["points"]] == pytest.approx(epoch_curve(0.975))
    losses = client.get(url, params={"metric": "val_loss", "run_id": ids[("bn", 32, 0)]}).json()["series"][0]
    assert losses["nonfinite_points"] == 1 and [p["value"] for p in losses["points"]] == [2.0]
    assert client.get(url, params={"max_points": -1}).status_code == 422


def test_aggregate_curves_per_cell(
    client: TestClient, finished_job: tuple[str, dict[tuple[str, int, int], str]]
) -> None:
    job_id, _ = finished_job
    body = client.get(f"/v1/jobs/{job_id}/curves/aggregate", params={"metric": "val_acc"}).json()
    cells = {(c["variant"], c["batch_size"]): c for c in body["cells"]}
    assert set(cells) == set(FINAL)
    gn2 = cells[("gn(4)", 2)]
    assert gn2["seeds"] == SEEDS and gn2["statuses"] == {"succeeded": 3}
    assert [p["epoch"] for p in gn2["points"]] == [1.0, 2.0, 3.0]
    for e, p in enumerate(gn2["points"]):
        vals = [epoch_curve(a or 0.0)[e] for a in FINAL[("gn(4)", 2)]]
        assert p["n"] == 3 and p["mean"] == pytest.approx(np.mean(vals))
        assert p["std"] == pytest.approx(np.std(vals, ddof=1))
        assert p["lower"] == pytest.approx(np.mean(vals) - np.std(vals, ddof=1))
        assert p["upper"] == pytest.approx(np.mean(vals) + np.std(vals, ddof=1))
        assert (p["min"], p["max"]) == (pytest.approx(min(vals)), pytest.approx(max(vals)))
    bn32 = cells[("bn", 32)]
    assert bn32["statuses"] == {"diverged": 2, "succeeded": 1}
    assert [p["n"] for p in bn32["points"]] == [3, 1, 1]  # the diverged seeds stop after epoch 1
    assert bn32["points"][1]["std"] is None and bn32["points"][1]["lower"] is None


def read_csv(resp: Any) -> list[dict[str, str]]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(resp.text)))


def test_export_csv_for_a_job_and_a_run(
    client: TestClient, settings: Settings, finished_job: tuple[str, dict[tuple[str, int, int], str]]
) -> None:
    job_id, ids = finished_job
    resp = client.get(f"/v1/jobs/{job_id}/export.csv")
    assert resp.headers["content-disposition"] == f'attachment; filename="normbench-job-{job_id}.csv"'
    assert resp.text.splitlines()[0] == "job_id,run_id,variant,batch_size,seed,step,epoch,name,value"
    rows = read_csv(resp)
    with session_factory(settings.resolved_database_url)() as s:
        stored = list(s.scalars(select(MetricPoint).join(Run).where(Run.job_id == job_id)))
    assert len(rows) == len(stored) > STEP_POINTS
    assert {(r["run_id"], int(r["step"]), r["name"]) for r in rows} == {(p.run_id, p.step, p.name) for p in stored}
    assert {r["job_id"] for r in rows} == {job_id}
    row = next(
        r for r in rows if r["run_id"] == ids[("gn(4)", 2, 0)] and r["name"] == "val_acc" and r["epoch"] == "2.0"
    )
    assert (row["variant"], row["batch_size"], row["seed"]) == ("gn(4)", "2", "0")
    assert float(row["value"]) == pytest.approx(0.98)
    assert any(r["value"] == "inf" for r in rows)  # a diverged run's last val_loss, as it was recorded

    run_id = ids[("bn", 8, 1)]
    resp = client.get(f"/v1/runs/{run_id}/export.csv")
    assert resp.headers["content-disposition"] == f'attachment; filename="normbench-run-{run_id}.csv"'
    run_rows = read_csv(resp)
    assert len(run_rows) == 2 * EPOCHS and {r["run_id"] for r in run_rows} == {run_id}
    assert [r["name"] for r in run_rows] == ["val_acc"] * 3 + ["val_loss"] * 3

    for path in (
        "/v1/jobs/missing/export.csv",
        "/v1/runs/missing/export.csv",
        "/v1/jobs/missing/curves/aggregate",
    ):
        assert client.get(path).status_code == 404, path


def test_cli_table_uses_one_vocabulary(
    client: TestClient, finished_job: tuple[str, dict[tuple[str, int, int], str]]
) -> None:
    from app.cli import cell_text, results_table

    job_id, _ = finished_job
    body = client.get(f"/v1/jobs/{job_id}/results").json()
    table = results_table(body)
    gn2 = next(c for c in body["cells"] if (c["variant"], c["batch_size"]) == ("gn(4)", 2))
    assert cell_text(gn2) == f"{np.mean(FINAL[('gn(4)', 2)]) * 100:.1f} ± {gn2['val_acc']['ci95_half_width'] * 100:.1f}"
    assert "mean ± half-width of the 95% t-interval" in table and "indistinguishable" not in table
    assert table.split("how to read this:\n")[1].splitlines()[0] == "  " + body["how_to_read"][0]

    def cell(values: list[float]) -> dict[str, Any]:
        s = st.summarize(values, bounds=(0.0, 1.0))
        acc = {
            "mean": s.mean,
            "std": s.std,
            "n": s.n,
            "ci95_low": s.ci_low,
            "ci95_high": s.ci_high,
            "ci95_half_width": s.half_width,
            "ci95_clipped": s.clipped,
        }
        return {"variant": "bn", "batch_size": 2, "n": s.n, "n_total": s.n, "diverged": 0, "val_acc": acc}

    assert cell_text(cell([0.995, 0.97, 1.0])) == "98.8 (94.8–100.0)"  # never "98.8 ± 4.0" (102.8%)
    assert cell_text(cell([0.987, 0.987])) == "98.7 (no spread)"  # never "98.7 ± 0.0"
    doc = {"cells": [cell([0.995, 0.97, 1.0])], "variants": ["bn"], "batch_sizes": [2]}
    assert "(low–high): the 95% interval, clipped to 0–100%" in results_table(doc)
    doc = {"cells": [cell([0.987, 0.987])], "variants": ["bn"], "batch_sizes": [2]}
    assert "(no spread): every seed gave the same value" in results_table(doc)
