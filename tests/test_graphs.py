"""What makes the packed training step capturable in a CUDA graph, checked on CPU.

A capture records kernels once and replays them with whatever the device memory then holds, so a
step is only safe to capture if it (1) never reads a tensor value on the host (no .item(), no
Python branch on a tensor), (2) keeps every piece of state in tensors that are updated in place,
at fixed addresses, and (3) takes every per-step scalar (data position, learning rate, sampling
flags) from device tensors. (1) is checked by running the step on the `meta` device, where any
host read raises; (2) and (3) by stepping on CPU with nothing changed from the host between steps
and comparing with the eager oracle (tests/test_packing.py does the full runs). The capture
itself and the replay-vs-eager comparison need a GPU: bench/gpu_grid.py runs them (`--check`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import workers.packing as packing
from app.schemas.jobs import OptimizerSpec
from workers.data import DeviceData
from workers.engine import PackTrainer, RunConfig
from workers.graphs import GraphedStep, compare, graphs_unavailable, restore, snapshot
from workers.packing import PackGroup
from workers.schedule import lr_at

CPU, META = torch.device("cpu"), torch.device("meta")
ROOT = Path(__file__).resolve().parent.parent
OPT = OptimizerSpec().model_dump()  # the spec's defaults: lr 0.1 at batch 32, linear scaling, cosine


class Quiet:
    def report(self, *args: Any, **kwargs: Any) -> None:
        pass

    def stop_reason(self) -> None:
        return None


def on(device: torch.device, data: DeviceData) -> DeviceData:
    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device)

    return DeviceData(
        data.kind,
        to(data.x_train),
        to(data.y_train),
        to(data.x_val),
        to(data.y_val),
        to(data.mean),
        to(data.std),
        data.input_shape,
        data.num_classes,
    )


def group(cfgs: list[RunConfig], data: DeviceData, device: torch.device) -> tuple[PackTrainer, PackGroup]:
    pack = PackTrainer(cfgs, data, device, [Quiet() for _ in cfgs])
    pack.regroup(pack.members)
    return pack, pack.groups[0]


def cnn(budget: dict[str, int], norm: str, **kw: Any) -> RunConfig:
    params = {"groups": 4} if norm in ("gn", "gn_ws", "evonorm_s0") else {}
    return replace(RunConfig("cnn", norm, params, 8, 0, budget, {"width": 8}, OPT, {}, 10), **kw)


def test_graphed_step_runs_eagerly_where_it_cannot_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    step = GraphedStep(lambda: calls.append(1), CPU, list, "cpu step")
    step()
    step()
    assert calls == [1, 1] and not step.captured and step.reason == "device is cpu"
    assert GraphedStep(lambda: None, CPU, list, "x", off="switched off").reason == "switched off"
    monkeypatch.setenv("NORMBENCH_CUDA_GRAPHS", "0")
    assert graphs_unavailable(torch.device("cuda")) == "switched off by NORMBENCH_CUDA_GRAPHS"
    monkeypatch.delenv("NORMBENCH_CUDA_GRAPHS")
    if not torch.cuda.is_available():
        assert graphs_unavailable(torch.device("cuda")) == "CUDA is not available"


def test_state_snapshots_and_comparison() -> None:
    a = [torch.tensor([1.0, float("nan")]), torch.tensor([3], dtype=torch.long)]
    saved = snapshot(a)
    a[0].add_(1)
    a[1].add_(1)
    assert compare(a, saved) is not None
    restore(a, saved)
    assert compare(a, saved) is None  # NaN where NaN counts as equal
    assert compare([torch.ones(2)], [torch.ones(2) + 1e-7]) is None
    assert "max abs difference" in (compare([torch.ones(2)], [torch.ones(2) * 1.1], ["w"]) or "")
    assert compare([torch.ones(2)], [torch.ones(3)]) is not None
    assert compare([torch.tensor([1])], [torch.tensor([2])], ["step"]) == "step: differs"


@pytest.mark.parametrize("norm", ["bn", "brn", "gn", "gn_ws", "frn", "evonorm_s0", "none"])
def test_the_step_never_reads_a_tensor_on_the_host(digits: tuple[DeviceData, dict[str, int]], norm: str) -> None:
    """On the meta device tensors have shapes but no values: any host read (.item(), float(), bool(),
    a Python `if` on a tensor) or any tensor left on another device raises. Every variant the engine
    captures (with BN-noise sampling, with the grad norm), with augmentation, must run there."""
    data, budget = digits
    cfg = cnn(budget, norm, augment={"hflip": True, "crop_padding": 2})
    for cfgs in ([cfg, cfg], [cfg]):  # a group of one steps without vmap
        _, g = group(cfgs, on(META, data), META)
        for noise in (False, True):
            for gradnorm in (False, True):
                g.train_step(noise, gradnorm)
        assert g.flat.device == META and g.step.device == META


@pytest.mark.parametrize("norm", ["bn", "brn", "gn"])
def test_a_group_of_one_steps_as_a_vmapped_one(digits: tuple[DeviceData, dict[str, int]], norm: str) -> None:
    """A single run's group calls the network directly on its views instead of through vmap: the same
    state after steps with every extra (BN noise, grad norm), to float32 round-off."""
    data, budget = digits
    cfg = cnn(budget, norm, augment={"hflip": True, "crop_padding": 1})
    states = []
    for vmapped in (False, True):
        _, g = group([cfg], data, CPU)
        g.vmap_one = vmapped
        for noise, gradnorm in [(True, False), (False, True), (True, True), (False, False)]:
            g.train_step(noise, gradnorm)
        states.append(snapshot(g.state()))
    for a, b in zip(*states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if norm == "bn":
        assert states[0][-1][0, 2] > 0  # BN noise was sampled (hook calls counted)


def test_the_evaluation_loops_never_read_a_tensor_on_the_host(
    digits: tuple[DeviceData, dict[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-batch bodies of train-mode evaluation and precise BN are captured too; only the result
    read at the very end may touch the host (it raises on meta, after every batch ran)."""
    data, budget = digits
    batches: list[str] = []

    class Counting(GraphedStep):
        def __call__(self) -> None:
            super().__call__()
            batches.append(self.name)

    monkeypatch.setattr(packing, "GraphedStep", Counting)
    cfg = RunConfig("cnn", "bn_precise", {"precise_samples": 64}, 8, 0, budget, {"width": 8}, OPT, {}, 10)
    _, g = group([cfg, cfg], on(META, data), META)
    with pytest.raises(RuntimeError, match="meta"):
        g.train_mode_accuracy()
    assert batches.count(f"{g.label} train-mode eval") == len(data.x_val) // 8
    g.refresh_precise_bn([0, 1])  # ends in device copies only
    assert batches.count(f"{g.label} precise BN") == 64 // 8


def test_the_step_updates_its_state_in_place(digits: tuple[DeviceData, dict[str, int]]) -> None:
    """A replayed graph writes to the addresses captured: state must never be reallocated, and the
    parameter views must keep aliasing the flat buffer the optimizer updates."""
    data, budget = digits
    cfg = cnn(budget, "bn", augment={"hflip": True})
    _, g = group([cfg, replace(cfg, seed=1)], data, CPU)
    state = g.state()
    addresses = [t.data_ptr() for t in state]
    before = snapshot(state)
    for noise, gradnorm in [(False, False), (True, False), (False, True), (True, True)]:
        g.train_step(noise, gradnorm)
    assert [t.data_ptr() for t in g.state()] == addresses
    changed = [not torch.equal(a, b) for a, b in zip(before, g.state(), strict=True)]
    assert all(changed[:2]) and g.step.tolist() == [4, 4]
    flat = g.flat.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == flat for p in g.params.values())
    assert all(p.requires_grad and p.is_leaf for p in g.params.values())


@pytest.mark.parametrize(("warmup_epochs", "schedule"), [(1, "cosine"), (0, "cosine"), (0.5, "constant")])
def test_the_learning_rate_comes_from_the_step_counter_on_the_device(
    digits: tuple[DeviceData, dict[str, int]], warmup_epochs: float, schedule: str
) -> None:
    data, one_epoch = digits
    budget = {**one_epoch, "epochs": 3, "total_samples": 3 * one_epoch["samples_per_epoch"]}
    opt = {**OPT, "warmup_epochs": warmup_epochs, "schedule": schedule}
    cfg = RunConfig("mlp", "gn", {"groups": 4}, 32, 0, budget, {"hidden": [16]}, opt, {}, 10)
    _, g = group([cfg], data, CPU)
    sched = g.sched
    steps = torch.arange(sched.total)
    g.step = steps  # every step of the schedule at once: the formula is elementwise
    device_lr = g.lr()
    host_lr = torch.tensor([lr_at(s, sched.total, sched.warmup, sched.base_lr, schedule) for s in steps.tolist()])
    torch.testing.assert_close(device_lr, host_lr.float(), rtol=2e-7, atol=0)


@pytest.mark.slow  # a subprocess that imports torch and runs the benchmark's parts: minutes on 2 cores
def test_the_gpu_benchmark_runs_on_a_cpu(tmp_path: Path) -> None:
    """bench/gpu_grid.py is meant for a GPU session with little time: keep it runnable (graphs fall back
    to eager here, which the table says), and its JSON carrying device, torch version and command."""
    out = tmp_path / "grid.json"
    cmd = [sys.executable, "bench/gpu_grid.py", "--quick", "--device", "cpu", "--parts", "check,steps", "--k", "2"]
    done = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ran eagerly here: device is cpu" in done.stdout
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("part seconds: check"), lines[-1]  # the table comes last, with no failed part
    assert any(line.split()[:2] == ["gn", "16"] for line in lines[-6:])
    result = json.loads(out.read_text())
    assert "errors" not in result, result.get("errors")
    assert result["info"]["torch"] == torch.__version__ and "gpu_grid.py --quick" in result["info"]["command"]
    assert result["info"]["device"].startswith("cpu")
    assert result["check"]["graph_vs_eager_max_abs_diff"] == 0.0  # both eager on a CPU: identical
    assert {(r["norm"], r["batch"]) for r in result["steps"]} == {(n, b) for n in ("bn", "gn") for b in (2, 8, 16)}
