"""The training engine on CPU, one run at a time (a pack of one): equal footing across variants and batch
sizes, determinism, outcomes, checkpoints."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.core.budget import resolve_budget, total_steps
from app.schemas.jobs import OptimizerSpec
from tests.oracle import batches
from tests.test_packing import Recorder
from workers.augment import apply_augmentation, epoch_augmentation
from workers.checkpoint import FORMAT, Checkpoint, read_checkpoint, write_checkpoint
from workers.data import DeviceData, epoch_order
from workers.engine import RunConfig, train
from workers.run_config import build_run_model
from workers.schedule import Schedule, lr_at, scaled_lr

OPT = OptimizerSpec().model_dump()  # the spec's defaults: lr 0.1 at batch 32, linear scaling, cosine


def config(budget: dict[str, int], **kw: object) -> RunConfig:
    base = RunConfig("mlp", "bn", {}, 8, 0, budget, {"hidden": [32, 32]}, OPT, {}, 10)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_budget_is_the_same_samples_for_every_batch_size() -> None:
    budget = resolve_budget(1437, 360, 10, [2, 4, 8, 16, 32])
    assert budget["samples_per_epoch"] == 1408 and budget["total_samples"] == 14080
    assert {total_steps(budget, b) * b for b in (2, 4, 8, 16, 32)} == {14080}


def test_data_order_depends_on_seed_only_and_batch_size_only_cuts_it() -> None:
    order = epoch_order(3, 0, 100, 96)
    assert torch.equal(order, epoch_order(3, 0, 100, 96))
    assert not torch.equal(order, epoch_order(4, 0, 100, 96))
    assert not torch.equal(order, epoch_order(3, 1, 100, 96))
    assert torch.equal(torch.cat(batches(order, 2)), torch.cat(batches(order, 32)))
    assert [len(b) for b in batches(order, 32)] == [32, 32, 32]


def test_same_seed_same_initial_weights_across_variants(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    models = [
        build_run_model(config(budget, norm=n, norm_params=p), data, torch.device("cpu"))
        for n, p in (("bn", {}), ("gn", {"groups": 4}), ("ln", {}), ("none", {}))
    ]
    weights = [[p for name, p in m.named_parameters() if p.ndim > 1] for m in models]
    for other in weights[1:]:
        assert all(torch.equal(a, b) for a, b in zip(weights[0], other, strict=True))
    other_seed = build_run_model(config(budget, seed=1), data, torch.device("cpu"))
    assert not torch.equal(next(other_seed.parameters()), weights[0][0])


@pytest.mark.slow
def test_same_seed_and_spec_give_identical_metrics(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    runs = [Recorder(), Recorder()]
    outcomes = [train(config(budget), data, torch.device("cpu"), r) for r in runs]
    assert outcomes[0].status == "succeeded"
    assert outcomes[0].final_metrics["val_acc"] == outcomes[1].final_metrics["val_acc"]
    timing = ("images_per_s", "step_time_ms")
    strip = [[(p.step, p.name, p.value) for p in r.points if p.name not in timing] for r in runs]
    assert strip[0] == strip[1] and len(strip[0]) > 5


def test_run_learns_and_reports_per_epoch_and_per_k_steps(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    rec = Recorder()
    outcome = train(config(budget, norm="gn", norm_params={"groups": 4}), data, torch.device("cpu"), rec)
    assert outcome.final_metrics["val_acc"] > 0.8  # one epoch of digits
    assert outcome.samples == budget["total_samples"] and outcome.steps == budget["total_samples"] // 8
    names = {p.name for p in rec.points}
    assert {"val_acc", "val_loss", "train_loss", "lr", "train_loss_step", "grad_norm", "step_time_ms"} <= names
    steps = [p.step for p in rec.points if p.name == "train_loss_step"]
    assert steps == list(range(10, outcome.steps + 1, 10))


def test_huge_learning_rate_diverges_with_the_step(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    opt = {**OPT, "lr": 1e4, "warmup_epochs": 0, "lr_scaling": "none"}
    outcome = train(config(budget, norm="none", optimizer=opt), data, torch.device("cpu"), Recorder())
    assert outcome.status == "diverged"
    assert "non-finite" in (outcome.error or "") and "step" in (outcome.error or "")


def test_cancellation_stops_the_run(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    outcome = train(config(budget, batch_size=2), data, torch.device("cpu"), Recorder(stop_after=40))
    assert outcome.status == "cancelled" and outcome.steps == 41


def final_points(rec: Recorder) -> dict[tuple[int, str], float]:
    return {(p.step, p.name): p.value for p in rec.points if p.name not in ("images_per_s", "step_time_ms")}


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [57, 720])  # mid-epoch (shutdown) and an epoch-boundary checkpoint
def test_resume_from_checkpoint_gives_the_uninterrupted_run(
    digits: tuple[DeviceData, dict[str, int]], stop_after: int
) -> None:
    data, one_epoch = digits
    budget = {**one_epoch, "epochs": 2, "total_samples": 2 * one_epoch["samples_per_epoch"]}
    cfg = config(budget, batch_size=2, norm="bn")
    full = Recorder()
    reference = train(cfg, data, torch.device("cpu"), full)
    first = Recorder(stop_after=stop_after, reason="shutdown")
    interrupted = train(cfg, data, torch.device("cpu"), first)
    if stop_after == 57:
        assert interrupted.status == "interrupted" and interrupted.steps == 58
    else:  # stop_after > one epoch: use the epoch checkpoint as if the worker had died after it
        assert interrupted.status == "interrupted" and len(first.checkpoints) == 2
    second = Recorder()
    resumed = train(cfg, data, torch.device("cpu"), second, resume=first.checkpoints[-1])
    assert resumed.status == "succeeded" and resumed.steps == reference.steps
    assert resumed.final_metrics["val_acc"] == reference.final_metrics["val_acc"]
    assert resumed.final_metrics["train_loss"] == pytest.approx(reference.final_metrics["train_loss"], rel=1e-6)
    merged = {**final_points(first), **final_points(second)}
    assert merged.keys() == final_points(full).keys()


def test_learning_rate_scaling_and_schedule() -> None:
    assert scaled_lr(OPT, 8) == pytest.approx(0.025)
    assert scaled_lr({**OPT, "lr_scaling": "sqrt"}, 8) == pytest.approx(0.05)
    assert scaled_lr({**OPT, "lr_scaling": "none"}, 8) == pytest.approx(0.1)
    assert lr_at(0, 100, 10, 1.0, "cosine") == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, "cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, "cosine") == pytest.approx(0.5)
    assert lr_at(99, 100, 10, 1.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(99, 100, 10, 1.0, "constant") == 1.0


def test_augmentation_keeps_shape_and_pixels() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    cpu = torch.device("cpu")
    flips = epoch_augmentation({"hflip": True}, 0, 0, 2, "image", cpu)
    assert flips is not None and flips.dy is None
    flipped = apply_augmentation(x, flips)
    for a, b in zip(flipped, x, strict=True):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))
    crops = epoch_augmentation({"crop_padding": 1}, 0, 0, 2, "image", cpu)
    assert crops is not None and crops.flip is None
    cropped = apply_augmentation(x, crops)
    assert cropped.shape == x.shape and cropped.dtype == torch.uint8
    assert set(cropped.unique().tolist()) <= set(x.unique().tolist()) | {0}
    assert epoch_augmentation({"hflip": True}, 0, 0, 2, "tabular", cpu) is None
    again = epoch_augmentation({"crop_padding": 1}, 0, 0, 2, "image", cpu)
    assert again is not None and crops.dy is not None and torch.equal(again.dy, crops.dy)  # (seed, epoch) only


@pytest.mark.slow
def test_diagnostics_bn_noise_and_train_eval_gap(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, budget = digits
    bn, gn = Recorder(), Recorder()
    bn_out = train(config(budget, batch_size=2), data, torch.device("cpu"), bn)
    gn_out = train(config(budget, batch_size=2, norm="gn", norm_params={"groups": 4}), data, torch.device("cpu"), gn)
    bn_names = {p.name for p in bn.points}
    assert {"bn_mean_noise", "bn_var_noise"} <= bn_names
    assert not {"bn_mean_noise", "bn_var_noise"} & {p.name for p in gn.points}
    # Two samples per batch: the batch statistics are far from the running ones.
    noise = next(p.value for p in bn.points if p.name == "bn_var_noise")
    assert noise > 0.3
    for out in (bn_out, gn_out):
        assert 0.0 <= out.final_metrics["val_acc_train_mode"] <= 1.0
    # GN has no batch statistics: train and eval mode agree exactly.
    assert gn_out.final_metrics["val_acc_train_mode"] == gn_out.final_metrics["val_acc"]


@pytest.mark.slow
def test_bn_precise_replaces_running_stats_with_population_stats(digits: tuple[DeviceData, dict[str, int]]) -> None:
    data, one_epoch = digits
    budget = {**one_epoch, "epochs": 2, "total_samples": 2 * one_epoch["samples_per_epoch"]}
    cfg = config(budget, batch_size=8, norm="bn_precise", norm_params={"precise_samples": 512})
    precise, ema = Recorder(), Recorder()
    assert train(cfg, data, torch.device("cpu"), precise).status == "succeeded"
    train(replace(cfg, norm="bn", norm_params={}), data, torch.device("cpu"), ema)
    state, ema_state = precise.checkpoints[0].model, ema.checkpoints[0].model  # after epoch 1
    # Same training (bn_precise trains exactly as bn); only the evaluation statistics differ.
    weight = next(k for k in state if k.endswith("weight"))
    assert torch.equal(state[weight], ema_state[weight])
    var = next(k for k in state if k.endswith("running_var"))
    assert not torch.allclose(state[var], ema_state[var])


@pytest.mark.slow
def test_checkpoints_round_trip_through_a_file(digits: tuple[DeviceData, dict[str, int]], tmp_path: Path) -> None:
    """A checkpoint written and read back resumes the run as the one in memory does; format-1 and
    format-2 dicts written by earlier versions stay readable."""
    data, one_epoch = digits
    budget = {**one_epoch, "epochs": 2, "total_samples": 2 * one_epoch["samples_per_epoch"]}
    cfg = config(budget, batch_size=8)
    first = Recorder(stop_after=30, reason="shutdown")
    assert train(cfg, data, torch.device("cpu"), first).status == "interrupted"
    ckpt = first.checkpoints[-1]
    write_checkpoint(ckpt, tmp_path / "c.pt")
    read = read_checkpoint(tmp_path / "c.pt", torch.device("cpu"))
    assert read.to_state().keys() == ckpt.to_state().keys() and read.to_state()["format"] == FORMAT == 2
    assert (read.epoch, read.batch, read.step, read.window, read.noise) == (0, 31, 31, ckpt.window, ckpt.noise)
    a, b = (train(cfg, data, torch.device("cpu"), Recorder(), resume=c) for c in (ckpt, read))
    assert a.final_metrics["val_acc"] == b.final_metrics["val_acc"] and a.steps == b.steps == 2 * 176
    old = {k: v for k, v in ckpt.to_state().items() if k != "noise"}  # format 2 as the first engines wrote it
    assert Checkpoint.from_state(old).noise is None
    v1 = {**old, "format": 1, "aug_rng": torch.Generator().get_state()}
    assert Checkpoint.from_state(v1).step == 31
    with pytest.raises(ValueError, match="format"):
        Checkpoint.from_state({**old, "format": 3})


def test_a_run_resumed_from_its_final_checkpoint_records_its_finals_without_training(
    digits: tuple[DeviceData, dict[str, int]], tmp_path: Path
) -> None:
    """The worker died after the last epoch but before the result was committed: the next attempt reads the
    final checkpoint (through a file, as a worker does) and records the same result, training no step."""
    data, one_epoch = digits
    cfg = config(one_epoch, batch_size=16)
    first = Recorder()
    done = train(cfg, data, torch.device("cpu"), first)
    final = first.checkpoints[-1]
    assert done.status == "succeeded" and final.final_metrics == done.final_metrics and final.step == done.steps
    assert all(c.final_metrics is None for c in first.checkpoints[:-1])
    write_checkpoint(final, tmp_path / "final.pt")
    again = Recorder()
    resumed = train(
        cfg, data, torch.device("cpu"), again, resume=read_checkpoint(tmp_path / "final.pt", torch.device("cpu"))
    )
    assert resumed.status == "succeeded" and resumed.steps == done.steps
    assert resumed.final_metrics == done.final_metrics
    assert again.progress == [] and again.points == []  # not one step trained again


def test_schedule_of_a_run() -> None:
    budget = resolve_budget(1437, 360, 2, [8])
    sched = Schedule.of(config(budget, optimizer={**OPT, "warmup_epochs": 0.5}))
    assert sched.per_epoch == budget["samples_per_epoch"] // 8 and sched.total == 2 * sched.per_epoch
    assert sched.warmup == round(sched.per_epoch / 2)
    assert sched.lr_after(0) == sched.base_lr == pytest.approx(0.025)
    assert sched.lr_after(100) == sched.lr(99) == lr_at(99, sched.total, sched.warmup, 0.025, "cosine")
