"""Run packing on CPU: packed runs train exactly as single runs, and keep their own fates.

`PackTrainer` (workers/engine.py, workers/packing.py) stacks runs with torch.func and trains them in one
vmapped step; the eager single-run loop of tests/oracle.py is the reference. Same seed and spec must give the same metrics to
float32 round-off, whatever else shares the pack, and one run's divergence, cancellation, lost claim
or shutdown must not change what the others compute.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.repositories.runs import claim_pack, finish_run, renew_leases
from app.schemas.jobs import OptimizerSpec
from app.tables import Run
from tests.factories import job_spec, wait_for_job
from tests.oracle import Trainer, train
from tests.test_faults import EPOCHS, FAST, LOG_EVERY, Workers, assert_complete_curves, slow_spec, wait_until
from workers.checkpoint import Checkpoint
from workers.data import DeviceData
from workers.engine import Outcome, PackTrainer, Point, Progress, RunConfig
from workers.engine import train as engine_train
from workers.packing import train_signature

CPU = torch.device("cpu")
OPT = OptimizerSpec().model_dump()  # the spec's defaults: lr 0.1 at batch 32, linear scaling, cosine
TIMING = ("images_per_s", "step_time_ms")
NORM_PARAMS: dict[str, dict[str, Any]] = {
    "bn": {},
    "bn_precise": {"precise_samples": 256},
    "brn": {},
    "gn": {"groups": 4},
    "gn_ws": {"groups": 4},
    "ln": {},
    "in": {},
    "frn": {},
    "evonorm_s0": {"groups": 4},
    "none": {},
}


class Recorder:
    """Keeps what the engine reports; after `stop_after` stop_reason calls answers `reason`, or raises it."""

    def __init__(self, stop_after: int | None = None, reason: str | Exception = "cancelled") -> None:
        self.points: list[Point] = []
        self.checkpoints: list[Checkpoint] = []
        self.progress: list[Progress] = []
        self.calls = 0
        self.stop_after, self.reason = stop_after, reason

    def report(self, points: list[Point], progress: Progress, checkpoint: Checkpoint | None = None) -> None:
        self.points += points
        self.progress.append(progress)
        if checkpoint is not None:
            self.checkpoints.append(checkpoint)

    def stop_reason(self) -> str | None:
        self.calls += 1
        if self.stop_after is None or self.calls <= self.stop_after:
            return None
        if isinstance(self.reason, Exception):
            raise self.reason
        return self.reason

    def curve(self) -> dict[tuple[int, str], float]:
        return {(p.step, p.name): p.value for p in self.points if p.name not in TIMING}


def config(budget: dict[str, int], **kw: Any) -> RunConfig:
    base = RunConfig("mlp", "bn", {}, 8, 0, budget, {"hidden": [32, 32], "width": 8}, OPT, {}, 10)
    return replace(base, **kw)


def two_epochs(budget: dict[str, int]) -> dict[str, int]:
    return {**budget, "epochs": 2, "total_samples": 2 * budget["samples_per_epoch"]}


def single(cfg: RunConfig, data: DeviceData, resume: Checkpoint | None = None) -> tuple[Outcome, Recorder]:
    """The run trained by the oracle (tests/oracle.py), the plain eager loop."""
    rec = Recorder()
    return train(cfg, data, CPU, rec, resume), rec


# Packed and single training run the same arithmetic in a different order (vmapped kernels), so they
# agree to float32 round-off at first; training then amplifies that round-off, on some CPUs enough to move
# a final accuracy by a few validation samples (seen: 0.8 points for one seed after 130 steps on an AVX-512
# machine, with differences of 1e-7 at step 50). A packing mistake (data order, learning rate, statistics)
# shows at once, so the first EXACT_STEPS steps are compared to round-off, the end results loosely.
EXACT_STEPS = 60
# Some runs amplify round-off far sooner: the GN CNN of seed 1 at batch 32 on an AMD EPYC agrees exactly at
# step 20, then differs by 1e-3 at step 30 and 2e-2 at step 40 (relative grad norm). Those are compared
# exactly for the first EARLY_CHAOS_STEPS steps (two logged points each).
EARLY_CHAOS_STEPS = 20
STEP_LOGGED = ("train_loss_step", "grad_norm")  # logged every few steps; epoch-end metrics are final ones


def assert_same_run(
    a: Outcome, rec_a: Recorder, b: Outcome, rec_b: Recorder, *, chaotic: bool = False, exact_steps: int = EXACT_STEPS
) -> None:
    """Two trainings of one run agree: status, budget, every logged value of the first EXACT_STEPS steps
    to round-off, and the final metrics to within amplified round-off.

    `chaotic` is for a model near chance whose training amplifies float32 round-off exponentially from
    the start (such as `in` on 8×8 digits, whose last stage normalizes over 2×2 positions: the single-run
    engine and a pack of one drift apart the same way): then only the first 20 steps' losses and the
    final losses to a few percent are compared."""
    assert (a.status, a.steps, a.samples) == (b.status, b.steps, b.samples)
    assert a.final_metrics.keys() == b.final_metrics.keys()
    curve_a, curve_b = rec_a.curve(), rec_b.curve()
    assert curve_a.keys() == curve_b.keys()
    for name in ("train_loss", "val_loss"):
        assert b.final_metrics[name] == pytest.approx(a.final_metrics[name], rel=0.05), name
    if chaotic:
        curve_a = {k: v for k, v in curve_a.items() if k[0] <= 20 and k[1] == "train_loss_step"}
    else:
        curve_a = {k: v for k, v in curve_a.items() if k[0] <= exact_steps and k[1] in STEP_LOGGED}
        for name, value in a.final_metrics.items():
            if name.startswith("val_acc"):
                assert b.final_metrics[name] == pytest.approx(value, abs=0.02), name
    for key, value in curve_a.items():
        if key[1] not in TIMING and not key[1].startswith("val_acc"):
            assert curve_b[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_packed_seeds_train_exactly_as_single_runs(
    digits: tuple[DeviceData, dict[str, int]], arch: str, norm: str
) -> None:
    data, budget = digits
    cfgs = [config(budget, arch=arch, norm=norm, norm_params=NORM_PARAMS[norm], seed=s) for s in range(3)]
    recs = [Recorder() for _ in cfgs]
    packed = PackTrainer(cfgs, data, CPU, recs).run()
    for cfg, out, rec in zip(cfgs, packed, recs, strict=True):
        assert isinstance(out, Outcome) and out.status == "succeeded"
        ref, ref_rec = single(cfg, data)
        assert ref.final_metrics["val_acc"] > 0.75  # they learned: accuracy equality means something
        assert_same_run(ref, ref_rec, out, rec)
        if norm == "bn":
            assert {"bn_mean_noise", "bn_var_noise"} <= out.final_metrics.keys()


@pytest.mark.slow
@pytest.mark.parametrize("norm", sorted(NORM_PARAMS))
def test_every_norm_packs(digits: tuple[DeviceData, dict[str, int]], norm: str) -> None:
    data, budget = digits
    cfgs = [config(budget, arch="cnn", norm=norm, norm_params=NORM_PARAMS[norm], batch_size=32, seed=s) for s in (0, 1)]
    recs = [Recorder() for _ in cfgs]
    packed = PackTrainer(cfgs, data, CPU, recs).run()
    for cfg, out, rec in zip(cfgs, packed, recs, strict=True):
        ref, ref_rec = single(cfg, data)
        assert isinstance(out, Outcome)
        exact = EARLY_CHAOS_STEPS if norm == "gn" else EXACT_STEPS
        assert_same_run(ref, ref_rec, out, rec, chaotic=norm == "in", exact_steps=exact)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "norm", "batch_size", "augment"),
    [("mlp", "bn", 2, {}), ("mlp", "bn", 8, {}), ("cnn", "gn", 8, {"hflip": True, "crop_padding": 1})],
)
def test_a_single_run_is_a_pack_of_one(
    digits: tuple[DeviceData, dict[str, int]], arch: str, norm: str, batch_size: int, augment: dict[str, Any]
) -> None:
    """What production runs for one run (workers.engine.train: a pack of one) trains as the oracle does.
    BN on two samples is chaotic (a near-zero batch variance makes huge gradients, seen from step ~30 on):
    there the first 20 steps are compared to round-off and the final losses loosely."""
    data, budget = digits
    cfg = config(budget, arch=arch, norm=norm, norm_params=NORM_PARAMS[norm], batch_size=batch_size, augment=augment)
    rec = Recorder()
    out = engine_train(cfg, data, CPU, rec)
    assert out.status == "succeeded"
    assert_same_run(*single(cfg, data), out, rec, chaotic=batch_size == 2)


@pytest.mark.slow
def test_a_pack_of_variants_groups_runs_that_train_alike(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    cfgs = [
        config(budget, norm="bn", seed=0),
        config(budget, norm="gn", norm_params={"groups": 4}, seed=0),
        config(budget, norm="bn_precise", norm_params={"precise_samples": 512}, seed=1),
        config(budget, norm="gn", norm_params={"groups": 4}, seed=1),
        config(budget, norm="bn_precise", norm_params={"precise_samples": 256}, seed=2),
    ]
    assert len({train_signature(c) for c in cfgs}) == 2  # bn_precise trains as bn
    recs = [Recorder() for _ in cfgs]
    trainer = PackTrainer(cfgs, data, CPU, recs)
    packed = trainer.run()
    assert trainer.execution() == {
        "engine": "pack",
        "pack_runs": 5,
        "largest_group": 3,
        "cuda_graph": False,
        "eager_reason": "device is cpu",
    }
    for cfg, out, rec in zip(cfgs, packed, recs, strict=True):
        assert isinstance(out, Outcome)
        assert_same_run(*single(cfg, data), out, rec)


@pytest.mark.slow
def test_augmentation_draws_are_per_run_and_packed_alike(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    cfgs = [config(budget, arch="cnn", augment={"hflip": True}, seed=s) for s in range(3)]
    recs = [Recorder() for _ in cfgs]
    packed = PackTrainer(cfgs, data, CPU, recs).run()
    for cfg, out, rec in zip(cfgs, packed, recs, strict=True):
        assert isinstance(out, Outcome)
        assert_same_run(*single(cfg, data), out, rec)
    unaugmented = single(replace(cfgs[0], augment={}), data)[0]
    assert unaugmented.final_metrics["train_loss"] != packed[0].final_metrics["train_loss"]  # type: ignore[union-attr]


@pytest.mark.slow
def test_bf16_autocast_packed_and_single(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    cfgs = [config(budget, arch="cnn", norm=n, norm_params=NORM_PARAMS[n], precision="bf16") for n in ("bn", "brn")]
    packed = PackTrainer(cfgs, data, CPU, [Recorder() for _ in cfgs]).run()
    for cfg, out in zip(cfgs, packed, strict=True):
        ref = single(cfg, data)[0]
        fp32 = single(replace(cfg, precision="fp32"), data)[0]
        assert isinstance(out, Outcome) and out.status == ref.status == "succeeded"
        assert ref.final_metrics["train_loss"] != fp32.final_metrics["train_loss"]  # bf16 really ran
        # bf16 rounding differs between the vmapped and the plain kernels: close, not equal
        assert out.final_metrics["train_loss"] == pytest.approx(ref.final_metrics["train_loss"], rel=0.02)
        assert abs(out.final_metrics["val_acc"] - ref.final_metrics["val_acc"]) < 0.03


@pytest.mark.slow
def test_checkpoints_resume_across_engines_and_positions(digits: tuple[DeviceData, dict[str, int]]) -> None:
    """A single run's mid-epoch checkpoint resumes inside a pack next to a fresh run (the pack's runs
    are then at different steps), and a packed run's epoch checkpoint resumes as a single run."""
    data, one_epoch = digits
    budget = two_epochs(one_epoch)
    a, b = (config(budget, norm="gn", norm_params={"groups": 4}, seed=s) for s in (0, 1))  # one group
    ref_a, ref_a_rec = single(a, data)
    ref_b, ref_b_rec = single(b, data)

    first = Recorder(stop_after=57, reason="shutdown")
    assert train(a, data, CPU, first).status == "interrupted"
    recs = [Recorder(), Recorder()]
    packed = PackTrainer([a, b], data, CPU, recs, [first.checkpoints[-1], None]).run()
    assert_same_run(ref_b, ref_b_rec, packed[1], recs[1])  # type: ignore[arg-type]
    resumed = packed[0]
    assert isinstance(resumed, Outcome) and resumed.steps == ref_a.steps
    assert resumed.final_metrics["val_acc"] == ref_a.final_metrics["val_acc"]
    assert resumed.final_metrics["train_loss"] == pytest.approx(ref_a.final_metrics["train_loss"], rel=1e-4)
    assert {**first.curve(), **recs[0].curve()}.keys() == ref_a_rec.curve().keys()

    epoch_ckpt = recs[1].checkpoints[0]  # the packed run's end-of-epoch-1 checkpoint
    assert epoch_ckpt.to_state()["format"] == 2 and epoch_ckpt.step == ref_b.steps // 2
    rest, rest_rec = single(b, data, resume=epoch_ckpt)
    assert rest.final_metrics["val_acc"] == ref_b.final_metrics["val_acc"]
    assert rest.final_metrics["train_loss"] == pytest.approx(ref_b.final_metrics["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_augmented_runs_resume_mid_epoch_with_the_same_draws(digits: tuple[DeviceData, dict[str, int]]) -> None:
    """Augmentation draws are a function of (seed, epoch): a run stopped mid-epoch resumes with the crops
    and flips it would have had, alone or packed next to a run at another position."""
    data, budget = digits
    cfg = config(budget, arch="cnn", augment={"hflip": True, "crop_padding": 1})
    ref, ref_rec = single(cfg, data)
    first = Recorder(stop_after=57, reason="shutdown")
    assert train(cfg, data, CPU, first).status == "interrupted"
    alone, _ = single(cfg, data, resume=first.checkpoints[-1])
    recs = [Recorder(), Recorder()]
    packed = PackTrainer([cfg, replace(cfg, seed=1)], data, CPU, recs, [first.checkpoints[-1], None]).run()
    for out in (alone, packed[0]):
        assert isinstance(out, Outcome) and out.steps == ref.steps
        assert out.final_metrics["val_acc"] == ref.final_metrics["val_acc"]
        assert out.final_metrics["train_loss"] == pytest.approx(ref.final_metrics["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_one_run_diverging_or_leaving_does_not_disturb_the_others(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    cfgs = [config(budget, seed=s) for s in range(5)]
    # Run 1 resumes from a checkpoint with a poisoned weight: its loss is NaN from then on.
    first = Recorder(stop_after=23, reason="shutdown")
    train(cfgs[1], data, CPU, first)
    poisoned = first.checkpoints[-1]
    weight = next(k for k in poisoned.model if k.endswith("weight"))
    poisoned.model[weight][0, 0] = float("nan")
    recs = [
        Recorder(),
        Recorder(),
        Recorder(stop_after=25, reason=RuntimeError("claim taken over")),  # lost its claim
        Recorder(stop_after=40, reason="cancelled"),
        Recorder(stop_after=60, reason="shutdown"),
    ]
    done: list[int] = []
    trainer = PackTrainer(
        cfgs, data, CPU, recs, [None, poisoned, None, None, None], on_done=lambda i, r: done.append(i)
    )
    out = trainer.run()
    assert isinstance(out[1], Outcome) and out[1].status == "diverged"
    assert out[1].error == "training loss became non-finite at step 25 (epoch 1)"  # resumed at 24; NaN at once
    assert isinstance(out[2], RuntimeError)
    assert isinstance(out[3], Outcome) and (out[3].status, out[3].steps) == ("cancelled", 41)
    assert isinstance(out[4], Outcome) and (out[4].status, out[4].steps) == ("interrupted", 61)
    assert recs[4].checkpoints and recs[4].checkpoints[-1].step == 61
    assert done == [1, 2, 3, 4, 0]  # each reported as it ended (run 1 started at step 24)
    assert_same_run(*single(cfgs[0], data), out[0], recs[0])  # type: ignore[arg-type]
    # The shut-down run resumes (alone) to the uninterrupted run's result.
    ref, _ = single(cfgs[4], data)
    rest, _ = single(cfgs[4], data, resume=recs[4].checkpoints[-1])
    assert rest.final_metrics["val_acc"] == ref.final_metrics["val_acc"]
    assert rest.final_metrics["train_loss"] == pytest.approx(ref.final_metrics["train_loss"], rel=1e-4)


def test_a_pack_refuses_runs_that_do_not_share_a_budget(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    with pytest.raises(ValueError, match="budget"):
        PackTrainer([config(budget), config(two_epochs(budget))], data, CPU, [Recorder(), Recorder()])


class GroupWatcher(Recorder):
    """Records, at every step, the identity of the group that trains its run."""

    def __init__(self) -> None:
        super().__init__()
        self.trainer: PackTrainer | None = None
        self.index = 0
        self.groups: list[int] = []

    def stop_reason(self) -> str | None:
        assert self.trainer is not None
        g, _ = self.trainer.group_of(self.trainer.members[self.index])
        self.groups.append(id(g))
        return super().stop_reason()


@pytest.mark.slow
def test_a_pack_of_batch_sizes_trains_each_as_its_own_pack(digits: tuple[DeviceData, dict[str, int]]) -> None:
    """Runs of one job at several batch sizes step side by side, each on its own schedule, exactly as
    packs of one batch size do; a batch size that finishes first leaves the other groups as they are
    (no re-stacking, so no new CUDA graphs on a GPU)."""
    data, budget = digits
    variants: list[tuple[str, dict[str, Any]]] = [("bn", {}), ("gn", {"groups": 4})]
    cfgs = [
        config(budget, batch_size=b, norm=n, norm_params=p, seed=s)
        for b in (2, 8, 32)
        for n, p in variants
        for s in (0, 1)
    ]
    assert len({train_signature(c) for c in cfgs}) == 6  # one group per batch size and variant
    recs = [GroupWatcher() for _ in cfgs]
    trainer = PackTrainer(cfgs, data, CPU, recs)
    for i, rec in enumerate(recs):
        rec.trainer, rec.index = trainer, i
    mixed = trainer.run()
    assert trainer.execution()["largest_group"] == 2
    for b in (2, 8, 32):
        at = [i for i, c in enumerate(cfgs) if c.batch_size == b]
        alone_recs = [Recorder() for _ in at]
        alone = PackTrainer([cfgs[i] for i in at], data, CPU, alone_recs).run()
        for i, out, rec in zip(at, alone, alone_recs, strict=True):
            got = mixed[i]
            assert isinstance(out, Outcome) and isinstance(got, Outcome) and got.status == "succeeded"
            assert got.samples == budget["samples_per_epoch"]  # the same samples at every batch size
            assert {k: v for k, v in got.final_metrics.items() if k not in TIMING} == pytest.approx(
                {k: v for k, v in out.final_metrics.items() if k not in TIMING}, rel=1e-6
            )
            assert recs[i].curve() == pytest.approx(rec.curve(), rel=1e-6)
            assert len(set(recs[i].groups)) == 1, f"batch {b} {cfgs[i].norm} was re-stacked"
    assert len(recs[0].groups) > len(recs[-1].groups)  # batch 2 outlived batch 32
    for i in (2, 3, 6, 7, 10, 11):  # gn trains stably from seed to seed: also equal to single runs
        assert cfgs[i].norm == "gn"
        assert_same_run(*single(cfgs[i], data), mixed[i], recs[i])  # type: ignore[arg-type]


def test_trainer_records_no_noise_outside_training_forwards(digits: tuple[DeviceData, dict[str, int]]) -> None:
    """BN-noise sampling is for training forwards; the precise-BN pass after an epoch must not add samples."""
    data, budget = digits
    trainer = Trainer(config(budget, norm="bn_precise", norm_params={"precise_samples": 256}), data, CPU, Recorder())
    trainer.step = 10  # a sampled step
    trainer.train_step(torch.arange(8))
    assert trainer.noise.sums[2] == 2 and not trainer.noise.active


# -- the database side: claiming a pack ---------------------------------------------------------------


def runs_of(settings: Settings, job_id: str) -> list[Run]:
    with session_scope(settings.resolved_database_url) as s:
        order = (Run.batch_size, Run.variant_index, Run.seed)
        runs = list(s.scalars(select(Run).where(Run.job_id == job_id).order_by(*order)))
        s.expunge_all()
    return runs


def test_claiming_a_pack(client: TestClient, settings: Settings) -> None:
    spec = job_spec("digits", variants=[{"norm": "bn"}, {"norm": "gn", "groups": 4}], seeds=[0, 1, 2], pack_size=2)
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    other_job = client.post("/v1/jobs", json=spec).json()["id"]
    runs = runs_of(settings, job_id)
    by_id = {r.id: r for r in runs}
    gn8 = {r.seed: r for r in runs if r.variant == "gn(4)" and r.batch_size == 8}
    db, lease = settings.resolved_database_url, 30.0
    with session_scope(db) as s:
        # Any member claims its whole pack, planned at submit: one variant and batch size, seeds 0 and 1.
        mates = claim_pack(s, gn8[1].id, "w1", lease, 3)
        assert [(by_id[c.run_id].variant, by_id[c.run_id].seed) for c in mates] == [("gn(4)", 0), ("gn(4)", 1)]
        assert all(c.attempt == 1 for c in mates)
        assert claim_pack(s, gn8[0].id, "w2", lease, 3) == []  # a mate's own task finds the pack taken
        rest = claim_pack(s, gn8[2].id, "w2", lease, 3)  # seed 2 is a pack of its own
    assert [c.run_id for c in rest] == [gn8[2].id]
    after = {r.id: r for r in runs_of(settings, job_id)}
    for c in [*mates, *rest]:
        assert after[c.run_id].status == "running" and after[c.run_id].lease_expires_at is not None
    assert sum(r.status == "running" for r in after.values()) == 3
    assert all(r.status == "queued" for r in runs_of(settings, other_job))
    # One heartbeat renews them all and notices a run it no longer holds.
    with session_scope(db) as s:
        finish_run(s, mates[0].run_id, mates[0].attempt, "succeeded")
        queued = next(r for r in runs if r.variant == "bn")
        states = renew_leases(s, [(c.run_id, c.attempt) for c in [*mates, *rest]] + [(queued.id, 7)], lease)
    assert states == {mates[0].run_id: None, mates[1].run_id: False, rest[0].run_id: False, queued.id: None}
    client.post(f"/v1/jobs/{job_id}/cancel")
    with session_scope(db) as s:
        assert renew_leases(s, [(mates[1].run_id, mates[1].attempt)], lease) == {mates[1].run_id: True}


# -- real worker processes ---------------------------------------------------------------------------


@pytest.fixture
def workers(tmp_path: Path, settings: Settings) -> Iterator[Workers]:
    """test_faults' worker pool: real worker processes with the fast lease settings (FAST)."""
    assert FAST["NORMBENCH_LEASE_SECONDS"] == "3"
    pool = Workers(tmp_path, settings)
    yield pool
    for w in pool.started:
        w.stop()


def job_runs(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/jobs/{job_id}/runs").json()  # type: ignore[no-any-return]


@pytest.mark.e2e
def test_a_packed_worker_trains_every_run_of_the_pack(client: TestClient, settings: Settings, workers: Workers) -> None:
    worker = workers.start("packer")
    job_id = client.post("/v1/jobs", json=slow_spec(seeds=[0, 1, 2, 3], budget={"epochs": 2})).json()["id"]
    job = wait_for_job(client, job_id, timeout=120)
    runs = job_runs(client, job_id)
    assert job["status"] == "succeeded" and [r["status"] for r in runs] == ["succeeded"] * 4
    assert [r["attempt"] for r in runs] == [1, 1, 1, 1]
    for r in runs:
        assert r["environment"]["engine"] == "pack" and r["environment"]["pack_runs"] == 4
        assert r["environment"]["precision"] == "fp32"
        metrics = client.get(f"/v1/runs/{r['id']}/metrics").json()["metrics"]
        assert [p["epoch"] for p in metrics["val_acc"]] == [1.0, 2.0]
        assert [p["step"] for p in metrics["train_loss_step"]] == list(range(LOG_EVERY, r["steps_done"] + 1, LOG_EVERY))
    assert len({r["final_metrics"]["val_acc"] for r in runs}) > 1  # four different seeds, four results
    # The three mates' own tasks find their runs taken and skip them.
    wait_until(lambda: worker.log_path.read_bytes().count(b"is not claimable") == 3, 30, "the mates' tasks")
    assert worker.log_path.read_bytes().count(b"packed with") == 1


@pytest.mark.e2e
def test_kill_9_during_a_packed_run_recovers_every_run_of_the_pack(
    client: TestClient, settings: Settings, workers: Workers
) -> None:
    first = workers.start("a")
    job_id = client.post("/v1/jobs", json=slow_spec(seeds=[0, 1, 2, 3])).json()["id"]
    wait_until(lambda: all(r["epochs_done"] >= 1 for r in job_runs(client, job_id)), 90, "epoch 1 of every run")
    assert {r["worker"].rsplit(":", 1)[1] for r in job_runs(client, job_id)} == {str(first.proc.pid)}
    os.kill(first.proc.pid, signal.SIGKILL)  # during epoch 2 of all four
    first.proc.wait()
    workers.start("b")
    job = wait_for_job(client, job_id, timeout=180)
    runs = job_runs(client, job_id)
    assert job["status"] == "succeeded" and [r["status"] for r in runs] == ["succeeded"] * 4
    for r in runs:
        assert r["attempt"] == 2
        steps_per_epoch = r["steps_done"] // EPOCHS
        assert r["environment"]["resumed_from_step"] == steps_per_epoch  # the epoch-1 checkpoint, not scratch
        assert_complete_curves(client, settings, r)
