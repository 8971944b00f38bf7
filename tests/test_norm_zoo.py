"""Tests for the normalization zoo: bn_precise, brn, gn_ws, frn, evonorm_s0.

Each layer is checked against its defining formula written out here (forward, and input
and parameter gradients through autograd on that formula), then the catalogue rules,
the API's VariantSpec and every network built with every norm it allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from app.core import catalogue
from app.core.catalogue import CatalogueError
from app.schemas.jobs import VariantSpec
from models import build_model, create_norm_layer, precise_bn_samples, recompute_bn_stats
from models.nets import BasicBlock, WSConv2d, WSLinear, standardize_weight
from models.norms import BatchRenorm, PreciseBatchNorm, is_norm_layer, norm_includes_activation

BATCH_SIZES = (1, 2, 8)
Params = dict[str, torch.Tensor]


def per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def randomize(layer: nn.Module) -> None:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()


def check_against_formula(
    layer: nn.Module, formula: Callable[[torch.Tensor, Params], torch.Tensor], x: torch.Tensor, tol: float = 1e-5
) -> None:
    """The layer's output, input gradient and parameter gradients equal those of `formula`
    (autograd through the by-hand expression, with copies of the layer's parameters)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    x2 = x.clone().requires_grad_()
    expected = formula(x2, params)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    (expected * upstream).sum().backward()

    layer.zero_grad()
    x1 = x.clone().requires_grad_()
    out = layer(x1)
    (out * upstream).sum().backward()

    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=10 * tol, atol=10 * tol)
    assert params, "a zoo layer without parameters"
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=10 * tol, atol=10 * tol, msg=name)


def _channel_stats(x: torch.Tensor, unbiased: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of an (N, C, *) tensor over all other dims."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.sum(1) / flat.shape[1]
    sq = ((flat - mean[:, None]) ** 2).sum(1)
    return mean, sq / (flat.shape[1] - 1 if unbiased else flat.shape[1])


# --- bn_precise --------------------------------------------------------------------------------------------


def _batch_norm_cases(channels: int) -> list[tuple[tuple[int, ...], int]]:
    """(shape, batch) pairs where batch statistics are defined: more than one value per channel."""
    shapes = [(channels, 3, 4), (channels,)]
    return [(shape, b) for shape in shapes for b in BATCH_SIZES if b * math.prod(shape[1:]) > 1]


@pytest.mark.parametrize(("shape", "batch"), _batch_norm_cases(5))
def test_precise_bn_trains_as_batch_norm(shape: tuple[int, ...], batch: int) -> None:
    torch.manual_seed(batch)
    layer = create_norm_layer("bn_precise", 5, precise_samples=100).train()
    assert isinstance(layer, PreciseBatchNorm) and layer.precise_samples == 100
    randomize(layer)
    x = torch.randn(batch, *shape) * 2 + 1

    def formula(x: torch.Tensor, p: Params) -> torch.Tensor:
        mean, var = _channel_stats(x, unbiased=False)
        xhat = (x - per_channel(mean, x)) / torch.sqrt(per_channel(var, x) + 1e-5)
        return xhat * per_channel(p["weight"], x) + per_channel(p["bias"], x)

    check_against_formula(layer, formula, x)


def _precise_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        PreciseBatchNorm(4, precise_samples=11),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        PreciseBatchNorm(3, precise_samples=11),
    )
    for m in model:
        if isinstance(m, PreciseBatchNorm):
            randomize(m)
    return model


def test_recompute_bn_stats_is_equal_weight_average_of_batch_stats() -> None:
    model = _precise_model()
    conv1, bn1, _, conv2, bn2 = model
    torch.manual_seed(3)
    batches = [torch.randn(n, 2, 5, 5) * 3 + 1 for n in (4, 4, 3)]

    # By hand: each layer sees the previous one normalized with its batch statistics.
    per_batch: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    with torch.no_grad():
        for xb in batches:
            z1 = F.conv2d(xb, conv1.weight, conv1.bias)
            per_batch[0].append(_channel_stats(z1, unbiased=True))
            mean, var = _channel_stats(z1, unbiased=False)
            h = (z1 - per_channel(mean, z1)) / torch.sqrt(per_channel(var, z1) + bn1.eps)
            h = torch.relu(h * per_channel(bn1.weight, z1) + per_channel(bn1.bias, z1))
            per_batch[1].append(_channel_stats(F.conv2d(h, conv2.weight, conv2.bias), unbiased=True))

    model.eval()
    conv1.train()  # a mixed mode that must come back as it was
    bn2.momentum = 0.3
    bn1.num_batches_tracked.fill_(17)
    assert precise_bn_samples(model) == 11
    assert recompute_bn_stats(model, iter(batches)) == 11

    for bn, stats in zip((bn1, bn2), per_batch, strict=True):
        torch.testing.assert_close(bn.running_mean, torch.stack([m for m, _ in stats]).mean(0))
        torch.testing.assert_close(bn.running_var, torch.stack([v for _, v in stats]).mean(0))
    assert [m.training for m in model] == [True, False, False, False, False]
    assert (bn1.momentum, bn2.momentum) == (0.1, 0.3)
    assert int(bn1.num_batches_tracked) == 17 and int(bn2.num_batches_tracked) == 0
    # Not what the exponential moving average would give.
    ema = _precise_model().train()
    with torch.no_grad():
        for xb in batches:
            ema(xb)
    assert not torch.allclose(ema[1].running_mean, bn1.running_mean, atol=1e-3)


def test_recompute_bn_stats_edge_cases() -> None:
    model = _precise_model()
    before = model[1].running_mean.clone()
    with pytest.raises(ValueError, match="at least one batch"):
        recompute_bn_stats(model, [])
    assert torch.equal(model[1].running_mean, before) and model[1].momentum == 0.1
    # No BatchNorm: nothing recomputed and the batches are not read.
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), create_norm_layer("gn", 4))

    def unreadable() -> Iterator[torch.Tensor]:
        raise AssertionError("batches read")
        yield torch.zeros(())

    assert recompute_bn_stats(plain, unreadable()) == 0
    assert precise_bn_samples(plain) is None
    bn_model = build_model("cnn", (1, 8, 8), 10, "bn", {}, width=8)
    assert precise_bn_samples(bn_model) is None
    precise = build_model("cnn", (1, 8, 8), 10, "bn_precise", {}, width=8)
    assert precise_bn_samples(precise) == catalogue.PARAMS["precise_samples"].default == 8192


# --- brn ------------------------------------------------------------------------------------------------------

BRN_RUNNING_MEAN = torch.tensor([0.0, 0.5, -10.0, 1.0, 0.0, 20.0])
BRN_RUNNING_VAR = torch.tensor([0.01, 2.0, 4.0, 9.0, 400.0, 3.0])


def _brn_limits_by_hand(step: int, r_max: float, d_max: float, warmup: int, ramp: int) -> tuple[float, float]:
    if ramp == 0:  # the bounds jump at the end of the warm-up
        return (r_max, d_max) if step >= warmup else (1.0, 0.0)
    progress = min(max((step - warmup) / ramp, 0.0), 1.0)
    return 1.0 + (r_max - 1.0) * progress, d_max * progress


def _brn_formula(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    r_max: float,
    d_max: float,
    eps: float,
    stop_grad: bool = True,
) -> Callable[[torch.Tensor, Params], torch.Tensor]:
    def formula(x: torch.Tensor, p: Params) -> torch.Tensor:
        mean_b, var_b = _channel_stats(x, unbiased=False)
        std_b = torch.sqrt(var_b + eps)
        std = torch.sqrt(running_var + eps)
        held_std_b, held_mean_b = (std_b.detach(), mean_b.detach()) if stop_grad else (std_b, mean_b)
        r = (held_std_b / std).clamp(1 / r_max, r_max)
        d = ((held_mean_b - running_mean) / std).clamp(-d_max, d_max)
        xhat = (x - per_channel(mean_b, x)) / per_channel(std_b, x) * per_channel(r, x) + per_channel(d, x)
        return xhat * per_channel(p["weight"], x) + per_channel(p["bias"], x)

    return formula


def _brn_layer(step: int, **params: float) -> BatchRenorm:
    layer = create_norm_layer("brn", 6, **params)
    assert isinstance(layer, BatchRenorm)
    randomize(layer)
    with torch.no_grad():
        layer.running_mean.copy_(BRN_RUNNING_MEAN)
        layer.running_var.copy_(BRN_RUNNING_VAR)
        layer.num_batches_tracked.fill_(step)
    return layer.train()


@pytest.mark.parametrize(("shape", "batch"), _batch_norm_cases(6))
@pytest.mark.parametrize("step", [0, 60, 500])
def test_brn_train_matches_definition(shape: tuple[int, ...], batch: int, step: int) -> None:
    # (N=1, C) has one value per channel: tested to raise below.
    cfg = {"r_max": 3.0, "d_max": 5.0, "warmup_steps": 10, "ramp_steps": 100}
    layer = _brn_layer(step, **cfg)
    torch.manual_seed(batch)
    x = torch.randn(batch, *shape) * 2 + 0.5
    r_max, d_max = _brn_limits_by_hand(step, 3.0, 5.0, 10, 100)
    check_against_formula(layer, _brn_formula(BRN_RUNNING_MEAN, BRN_RUNNING_VAR, r_max, d_max, 1e-5), x)

    # The training forward moved the running statistics by momentum 0.1, with the
    # unbiased batch variance, and counted one step.
    assert int(layer.num_batches_tracked) == step + 1
    mean_b, var_b = _channel_stats(x, unbiased=True)
    torch.testing.assert_close(layer.running_mean, 0.9 * BRN_RUNNING_MEAN + 0.1 * mean_b)
    torch.testing.assert_close(layer.running_var, 0.9 * BRN_RUNNING_VAR + 0.1 * var_b)


def test_brn_clips_in_this_setup() -> None:
    # The definition test above only means something if r and d are clipped for some
    # channels and not for others.
    torch.manual_seed(8)
    x = torch.randn(8, 6, 3, 4) * 2 + 0.5
    mean_b, var_b = _channel_stats(x, unbiased=False)
    std = torch.sqrt(BRN_RUNNING_VAR + 1e-5)
    r = torch.sqrt(var_b + 1e-5) / std
    d = (mean_b - BRN_RUNNING_MEAN) / std
    r_max, d_max = _brn_limits_by_hand(500, 3.0, 5.0, 10, 100)
    assert ((r > r_max) | (r < 1 / r_max)).any() and ((r < r_max) & (r > 1 / r_max)).any()
    assert (d.abs() > d_max).any() and (d.abs() < d_max).any()


def test_brn_r_and_d_carry_no_gradient() -> None:
    # Unclipped bounds, so r and d equal their unclipped values and a gradient through
    # them would change the input gradient.
    layer = _brn_layer(0, r_max=50.0, d_max=50.0, ramp_steps=0)
    torch.manual_seed(0)
    x = torch.randn(4, 6, 3, 3) * 2 + 0.5
    check_against_formula(layer, _brn_formula(BRN_RUNNING_MEAN, BRN_RUNNING_VAR, 50.0, 50.0, 1e-5), x)
    layer = _brn_layer(0, r_max=50.0, d_max=50.0, ramp_steps=0)
    leaky = _brn_formula(BRN_RUNNING_MEAN, BRN_RUNNING_VAR, 50.0, 50.0, 1e-5, stop_grad=False)
    with pytest.raises(AssertionError):
        check_against_formula(layer, leaky, x)


@pytest.mark.parametrize(
    ("warmup", "ramp", "steps"),
    [(0, 1000, [0, 1, 250, 999, 1000, 5000]), (100, 50, [0, 99, 100, 110, 149, 150, 151]), (20, 0, [0, 19, 20, 21])],
)
def test_brn_ramp(warmup: int, ramp: int, steps: list[int]) -> None:
    layer = create_norm_layer("brn", 4, r_max=4.0, d_max=2.0, warmup_steps=warmup, ramp_steps=ramp)
    assert isinstance(layer, BatchRenorm)
    for step in steps:
        layer.num_batches_tracked.fill_(step)
        r_max, d_max = layer.limits()
        assert (float(r_max), float(d_max)) == pytest.approx(_brn_limits_by_hand(step, 4.0, 2.0, warmup, ramp))
    # Defaults: no warm-up, then a 1000-step ramp to r_max 3, d_max 5.
    default = create_norm_layer("brn", 4)
    assert isinstance(default, BatchRenorm)
    assert (default.r_max, default.d_max, default.warmup_steps, default.ramp_steps) == (3.0, 5.0, 0, 1000)


def test_brn_counts_training_forwards_and_resumes_from_state_dict() -> None:
    layer = create_norm_layer("brn", 4, warmup_steps=2, ramp_steps=4).train()
    x = torch.randn(3, 4, 2, 2)
    for _ in range(3):
        layer(x)
    layer.eval()
    layer(x)  # evaluation does not count
    assert int(layer.num_batches_tracked) == 3
    resumed = create_norm_layer("brn", 4, warmup_steps=2, ramp_steps=4)
    resumed.load_state_dict(layer.state_dict())
    assert isinstance(resumed, BatchRenorm)
    assert [float(t) for t in resumed.limits()] == pytest.approx(_brn_limits_by_hand(3, 3.0, 5.0, 2, 4))


def test_brn_warmup_is_batch_norm_and_eval_uses_running_stats() -> None:
    torch.manual_seed(0)
    brn = create_norm_layer("brn", 6, warmup_steps=5).train()
    bn = create_norm_layer("bn", 6).train()
    randomize(brn)
    bn.load_state_dict({k: v for k, v in brn.state_dict().items()})
    for _ in range(3):
        x = torch.randn(4, 6, 3, 3) * 2 + 1
        torch.testing.assert_close(brn(x), bn(x))
    torch.testing.assert_close(brn.running_mean, bn.running_mean)
    torch.testing.assert_close(brn.running_var, bn.running_var)

    brn.eval()
    x = torch.randn(2, 6, 3, 3)
    expected = (x - per_channel(brn.running_mean, x)) / torch.sqrt(per_channel(brn.running_var, x) + 1e-5)
    expected = expected * per_channel(brn.weight, x) + per_channel(brn.bias, x)
    torch.testing.assert_close(brn(x), expected)
    torch.testing.assert_close(brn(x[:1]), expected[:1])  # per sample in eval mode


def test_brn_rejects_one_value_per_channel() -> None:
    layer = create_norm_layer("brn", 6).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 6))
    with pytest.raises(ValueError, match="at least 2 dims"):
        layer(torch.randn(6))


# --- gn_ws ------------------------------------------------------------------------------------------------


def _standardized_by_hand(w: torch.Tensor) -> torch.Tensor:
    rows = []
    for o in range(w.shape[0]):
        flat = w[o].reshape(-1)
        mean = flat.sum() / flat.numel()
        var = ((flat - mean) ** 2).sum() / flat.numel()
        rows.append((w[o] - mean) / torch.sqrt(var + 1e-5))
    return torch.stack(rows)


def test_standardize_weight() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3) * 4 + 2
    ws = standardize_weight(w)
    torch.testing.assert_close(ws, _standardized_by_hand(w))
    torch.testing.assert_close(ws.mean(dim=(1, 2, 3)), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(ws.var(dim=(1, 2, 3), unbiased=False), torch.ones(5), atol=1e-4, rtol=0)


def _group_norm_by_hand(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    per_group = x.shape[1] // groups
    chunks = []
    for g in range(groups):
        chunk = x[:, g * per_group : (g + 1) * per_group]
        flat = chunk.reshape(x.shape[0], -1)
        mean = flat.mean(1).reshape((-1,) + (1,) * (x.dim() - 1))
        var = ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1).reshape(mean.shape)
        chunks.append((chunk - mean) / torch.sqrt(var + 1e-5))
    return torch.cat(chunks, 1) * per_channel(weight, x) + per_channel(bias, x)


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_gn_ws_conv_then_norm_matches_definition(batch: int) -> None:
    torch.manual_seed(batch)
    block = nn.Sequential(WSConv2d(3, 6, 3, padding=1, bias=False), create_norm_layer("gn_ws", 6, groups=3))
    randomize(block)
    x = torch.randn(batch, 3, 5, 4)

    def formula(x: torch.Tensor, p: Params) -> torch.Tensor:
        z = F.conv2d(x, _standardized_by_hand(p["0.weight"]), padding=1)
        return _group_norm_by_hand(z, 3, p["1.weight"], p["1.bias"])

    check_against_formula(block, formula, x, tol=1e-4)


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_ws_linear_then_norm_matches_definition(batch: int) -> None:
    torch.manual_seed(batch)
    block = nn.Sequential(WSLinear(5, 8), create_norm_layer("gn_ws", 8, group_size=2))
    randomize(block)
    x = torch.randn(batch, 5)

    def formula(x: torch.Tensor, p: Params) -> torch.Tensor:
        z = x @ _standardized_by_hand(p["0.weight"]).t() + p["0.bias"]
        return _group_norm_by_hand(z, 4, p["1.weight"], p["1.bias"])

    check_against_formula(block, formula, x, tol=1e-4)


def test_gn_ws_networks_standardize_the_layers_before_norms() -> None:
    def layer_types(model: nn.Module) -> list[str]:
        return [type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]

    resnet = build_model("resnet", (3, 16, 16), 10, "gn_ws", {}, depth=8, width=8)
    # stem, then conv1/conv2 per block; the two projection shortcuts (no norm after them) stay plain.
    assert layer_types(resnet) == ["WSConv2d"] * 3 + ["WSConv2d", "WSConv2d", "Conv2d"] * 2 + ["Linear"]
    cnn = build_model("cnn", (1, 8, 8), 10, "gn_ws", {}, width=8)
    assert layer_types(cnn) == ["WSConv2d"] * 3 + ["Linear"]
    mlp = build_model("mlp", (64,), 10, "gn_ws", {"groups": 4}, hidden=[32, 16])
    assert layer_types(mlp) == ["WSLinear", "WSLinear", "Linear"]
    assert layer_types(build_model("cnn", (1, 8, 8), 10, "gn", {}, width=8)) == ["Conv2d"] * 3 + ["Linear"]

    # Weight Standardization makes the output independent of each standardized layer's weight scale.
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    before = cnn(x)
    with torch.no_grad():
        for m in cnn.modules():
            if isinstance(m, WSConv2d):
                m.weight.mul_(7.0)
    torch.testing.assert_close(cnn(x), before, rtol=1e-4, atol=1e-4)


# --- frn and evonorm_s0 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("shape", [(6, 4, 4), (5, 3, 2), (4, 7)])
def test_frn_matches_definition(shape: tuple[int, ...], batch: int) -> None:
    torch.manual_seed(batch)
    layer = create_norm_layer("frn", shape[0]).train()
    randomize(layer)
    x = torch.randn(batch, *shape) * 3 + 1

    def formula(x: torch.Tensor, p: Params) -> torch.Tensor:
        nu2 = (x * x).flatten(2).mean(2)  # mean square over spatial positions, per sample and channel
        nu2 = nu2.reshape(nu2.shape + (1,) * (x.dim() - 2))
        y = per_channel(p["weight"], x) * x / torch.sqrt(nu2 + abs(1e-6)) + per_channel(p["bias"], x)
        return torch.maximum(y, per_channel(p["tau"], x))

    check_against_formula(layer, formula, x)


def test_frn_and_evonorm_parameters_and_inputs() -> None:
    frn = create_norm_layer("frn", 4)
    assert {n: p.tolist() for n, p in frn.named_parameters()} == {
        "weight": [1.0] * 4,
        "bias": [0.0] * 4,
        "tau": [0.0] * 4,
    }
    assert frn.eps == 1e-6 and not any("eps" in n for n, _ in frn.named_parameters())
    evo = create_norm_layer("evonorm_s0", 4)
    assert {n: p.tolist() for n, p in evo.named_parameters()} == {
        "weight": [1.0] * 4,
        "bias": [0.0] * 4,
        "v": [1.0] * 4,
    }
    assert evo.eps == 1e-5
    for layer in (frn, evo):
        with pytest.raises(ValueError, match="needs .* spatial positions"):
            layer(torch.randn(2, 4))


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize(
    ("channels", "params", "groups", "spatial"),
    [(6, {"groups": 3}, 3, (4, 4)), (64, {}, 32, (2, 3)), (8, {}, 8, (3, 3)), (6, {"groups": 1}, 1, (5,))],
)
def test_evonorm_s0_matches_definition(
    channels: int, params: dict, groups: int, spatial: tuple[int, ...], batch: int
) -> None:
    torch.manual_seed(batch)
    layer = create_norm_layer("evonorm_s0", channels, **params).train()
    assert layer.num_groups == groups
    randomize(layer)
    x = torch.randn(batch, channels, *spatial) * 2 + 0.5

    def formula(x: torch.Tensor, p: Params) -> torch.Tensor:
        per_group = channels // groups
        stds = []
        for g in range(groups):
            flat = x[:, g * per_group : (g + 1) * per_group].reshape(batch, -1)
            var = ((flat - flat.mean(1, keepdim=True)) ** 2).mean(1)
            std = torch.sqrt(var + 1e-5).reshape((batch, 1) + (1,) * len(spatial))
            stds.append(std.expand((batch, per_group, *spatial)))
        numerator = x * torch.sigmoid(per_channel(p["v"], x) * x)
        return numerator / torch.cat(stds, 1) * per_channel(p["weight"], x) + per_channel(p["bias"], x)

    check_against_formula(layer, formula, x, tol=1e-5)


def test_activation_norms_replace_the_relu_after_them() -> None:
    def relus(model: nn.Module) -> int:
        return sum(isinstance(m, nn.ReLU) for m in model.modules())

    for norm in catalogue.NORMS:
        includes = catalogue.NORMS[norm].includes_activation
        assert norm_includes_activation(norm) == includes == (norm in ("frn", "evonorm_s0"))
        if catalogue.NORMS[norm].needs_spatial is False:
            assert relus(build_model("mlp", (64,), 10, norm, {}, hidden=[32, 16])) == 2
        assert relus(build_model("cnn", (1, 8, 8), 10, norm, {}, width=8)) == (0 if includes else 3)
        # The ReLU after each residual addition stays.
        resnet = build_model("resnet", (3, 16, 16), 10, norm, {}, depth=8, width=8)
        assert relus(resnet) == (3 if includes else 7)
    with pytest.raises(CatalogueError, match="unknown norm 'tlu'"):
        norm_includes_activation("tlu")


# --- batch independence -------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", list(catalogue.NORMS))
def test_batch_independent_norms_give_each_sample_its_own_output(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet", (3, 8, 8), 10, norm, {}, depth=8, width=8, zero_init_last=False).train()
    x = torch.randn(1, 3, 8, 8)
    alone = model(x)
    for others in (torch.randn(1, 3, 8, 8) * 4 + 2, torch.randn(7, 3, 8, 8)):
        together = model(torch.cat([x, others]))[:1]
        independent = torch.allclose(alone, together, rtol=1e-4, atol=1e-5)
        assert independent == (not catalogue.NORMS[norm].batch_dependent), norm


# --- networks ------------------------------------------------------------------------------------------------

NETS: list[tuple[str, tuple[int, ...], dict]] = [
    ("mlp", (64,), {"hidden": [32, 16]}),
    ("cnn", (1, 8, 8), {"width": 8}),
    ("resnet", (3, 16, 16), {"depth": 8, "width": 8}),
]


def _sites(arch: str, kwargs: dict) -> list[catalogue.NormSite]:
    return catalogue.norm_sites(arch, **kwargs)


def _allowed(arch: str, kwargs: dict, norm: str) -> bool:
    try:
        catalogue.check_variant(norm, {}, _sites(arch, kwargs))
    except CatalogueError:
        return False
    return True


ALLOWED = [(*net, norm) for net in NETS for norm in catalogue.NORMS if _allowed(net[0], net[2], norm)]
DISALLOWED = [(*net, norm) for net in NETS for norm in catalogue.NORMS if not _allowed(net[0], net[2], norm)]


def test_allowed_combinations() -> None:
    assert (
        {(arch, norm) for arch, _, _, norm in DISALLOWED}
        == {("mlp", n) for n, info in catalogue.NORMS.items() if info.needs_spatial}
        == {("mlp", "in"), ("mlp", "frn"), ("mlp", "evonorm_s0")}
    )


@pytest.mark.parametrize(("arch", "shape", "kwargs", "norm"), ALLOWED, ids=lambda v: str(v))
def test_every_network_trains_with_every_allowed_norm(
    arch: str, shape: tuple[int, ...], kwargs: dict, norm: str
) -> None:
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, norm, {}, **kwargs).train()
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert len(norms) == len(_sites(arch, kwargs))
    x = torch.randn(4, *shape)
    loss = F.cross_entropy(model(x), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize(("arch", "shape", "kwargs", "norm"), DISALLOWED, ids=lambda v: str(v))
def test_disallowed_combinations_raise(arch: str, shape: tuple[int, ...], kwargs: dict, norm: str) -> None:
    msg = f"norm '{norm}' needs spatial positions; use it with 'cnn' or 'resnet', not 'mlp'"
    with pytest.raises(CatalogueError, match=msg):
        build_model(arch, shape, 10, norm, {}, **kwargs)


@pytest.mark.parametrize(("arch", "shape", "kwargs"), NETS)
def test_same_seed_same_initial_weights_for_every_norm(arch: str, shape: tuple[int, ...], kwargs: dict) -> None:
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for norm in catalogue.NORMS:
        if not _allowed(arch, kwargs, norm):
            continue
        torch.manual_seed(123)
        model = build_model(arch, shape, 10, norm, {}, **kwargs)
        weights[norm] = {
            name: t
            for name, t in model.state_dict().items()
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Conv2d | nn.Linear)
        }
    assert {"bn", "gn_ws"} <= set(weights) and (arch == "mlp" or {"frn", "evonorm_s0"} <= set(weights))
    reference = weights["bn"]
    assert reference
    for norm, w in weights.items():
        assert w.keys() == reference.keys(), norm
        for name, t in reference.items():
            assert torch.equal(w[name], t), (norm, name)


@pytest.mark.parametrize("norm", [n for n in catalogue.NORMS if n != "none"])
@pytest.mark.parametrize("zero_init_last", [True, False])
def test_zero_init_last_with_every_scaled_norm(norm: str, zero_init_last: bool) -> None:
    model = build_model("resnet", (3, 8, 8), 10, norm, {}, depth=8, width=8, zero_init_last=zero_init_last)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    for block in blocks:
        assert torch.equal(block.norm1.weight, torch.ones(8 * 2 ** blocks.index(block)))
        assert torch.equal(block.norm2.weight, torch.full_like(block.norm2.weight, 0.0 if zero_init_last else 1.0))
    # A zeroed last scale makes the first block (identity shortcut) start as ReLU(x).
    x = torch.randn(2, 8, 8, 8)
    out = blocks[0].train()(x.clone())
    assert torch.allclose(out, torch.relu(x)) == zero_init_last


# --- catalogue and API spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "params", "message"),
    [
        ("brn", {"r_max": 0.5}, "r_max must be between 1.0 and 100.0, got 0.5"),
        ("brn", {"d_max": -1.0}, "d_max must be between 0.0 and 100.0"),
        ("brn", {"warmup_steps": -1}, "warmup_steps must be between 0 and"),
        ("brn", {"ramp_steps": 2.5}, "ramp_steps must be an integer, got 2.5"),
        ("brn", {"r_max": float("nan")}, "r_max must be a finite number"),
        ("brn", {"r_max": True}, "r_max must be a finite number, got True"),
        ("brn", {"groups": 2}, r"does not take groups \(takes r_max, d_max, warmup_steps, ramp_steps\)"),
        ("bn_precise", {"precise_samples": 0}, "precise_samples must be between 1 and 1000000, got 0"),
        ("bn_precise", {"precise_samples": 1_000_001}, "precise_samples must be between 1 and 1000000"),
        ("bn_precise", {"r_max": 2.0}, r"does not take r_max \(takes precise_samples\)"),
        ("frn", {"groups": 2}, r"does not take groups \(takes no parameters\)"),
        ("evonorm_s0", {"group_size": 2}, r"does not take group_size \(takes groups\)"),
        (
            "evonorm_s0",
            {"groups": 3},
            r"evonorm_s0 groups=3 does not divide a layer with 8 channels \(layer 'stage0'\)",
        ),
        (
            "gn_ws",
            {"group_size": 32},
            r"gn_ws group_size 32 does not divide a layer with 8 channels \(layer 'stage0'\)",
        ),
        ("gn_ws", {"groups": 2, "group_size": 2}, "gn_ws takes either `groups` or `group_size`, not both"),
    ],
)
def test_check_variant_messages(norm: str, params: dict, message: str) -> None:
    with pytest.raises(CatalogueError, match=message):
        catalogue.check_variant(norm, params, catalogue.norm_sites("cnn", width=8))
    with pytest.raises(CatalogueError, match=message):
        build_model("cnn", (1, 8, 8), 10, norm, params, width=8)


def test_check_variant_accepts_bounds_and_ints_for_floats() -> None:
    sites = catalogue.norm_sites("resnet", depth=8, width=8)
    for params in (
        {"r_max": 1, "d_max": 0, "warmup_steps": 0, "ramp_steps": 0},
        {"r_max": 100.0, "d_max": 100.0, "warmup_steps": 100_000_000, "ramp_steps": 100_000_000},
    ):
        catalogue.check_variant("brn", params, sites)
    catalogue.check_variant("bn_precise", {"precise_samples": 1_000_000}, sites)
    catalogue.check_variant("evonorm_s0", {"groups": 8}, sites)
    assert catalogue.resolved_params("brn", {"r_max": 2.0}) == {
        "r_max": 2.0,
        "d_max": 5.0,
        "warmup_steps": 0,
        "ramp_steps": 1000,
    }


@pytest.mark.parametrize(
    ("norm", "params", "label"),
    [
        ("bn", {}, "bn"),
        ("gn", {"groups": 16}, "gn(16)"),
        ("gn", {"group_size": 8}, "gn(size=8)"),
        ("gn_ws", {"groups": 16}, "gn_ws(16)"),
        ("gn_ws", {"group_size": 4}, "gn_ws(size=4)"),
        ("gn_ws", {}, "gn_ws"),
        ("evonorm_s0", {"groups": 8}, "evonorm_s0(8)"),
        ("evonorm_s0", {}, "evonorm_s0"),
        ("frn", {}, "frn"),
        ("brn", {}, "brn"),
        ("brn", {"r_max": 3.0, "d_max": 5, "warmup_steps": 0, "ramp_steps": 1000}, "brn"),
        ("brn", {"r_max": 2.0}, "brn(r2,d5)"),
        ("brn", {"d_max": 2.5}, "brn(r3,d2.5)"),
        ("brn", {"r_max": 3.0000001}, "brn(r3.0000001,d5)"),
        ("brn", {"warmup_steps": 500, "ramp_steps": 2000}, "brn(warmup=500,ramp=2000)"),
        ("brn", {"r_max": 4, "ramp_steps": 10}, "brn(r4,d5,ramp=10)"),
        ("bn_precise", {}, "bn_precise"),
        ("bn_precise", {"precise_samples": 8192}, "bn_precise"),
        ("bn_precise", {"precise_samples": 4096}, "bn_precise(n=4096)"),
    ],
)
def test_variant_labels(norm: str, params: dict, label: str) -> None:
    assert catalogue.variant_label(norm, params) == label
    spec = VariantSpec(norm=norm, **params)
    assert spec.key() == label


def test_variant_spec_params_and_bounds() -> None:
    spec = VariantSpec(norm="brn", r_max=2, ramp_steps=10)
    assert spec.params() == {
        "groups": None,
        "group_size": None,
        "precise_samples": None,
        "r_max": 2.0,
        "d_max": None,
        "warmup_steps": None,
        "ramp_steps": 10,
    }
    assert set(spec.params()) == set(catalogue.PARAMS)
    assert isinstance(spec.params()["r_max"], float)
    catalogue.check_variant(spec.norm, spec.params(), catalogue.norm_sites("cnn"))
    with pytest.raises(CatalogueError, match=r"norm 'bn' does not take r_max \(takes no parameters\)"):
        catalogue.check_variant("bn", VariantSpec(norm="bn", r_max=2).params(), [])
    for bad in ({"r_max": 0.5}, {"d_max": -0.1}, {"warmup_steps": -1}, {"precise_samples": 0}, {"ramp_steps": 1.5}):
        with pytest.raises(ValidationError):
            VariantSpec(norm="brn", **bad)


def test_variant_spec_documents_every_norm_and_parameter() -> None:
    props = VariantSpec.model_json_schema()["properties"]
    assert set(props) == {"norm", *catalogue.PARAMS}
    for name, info in catalogue.NORMS.items():
        assert f"`{name}` ({info.title}): {info.description}" in props["norm"]["description"]
    for param in catalogue.PARAMS:
        description = props[param]["description"]
        takers = catalogue.norms_taking(param)
        assert takers and all(f"`{n}`" in description for n in takers), param
        assert catalogue.PARAMS[param].description in description
    assert "`gn`, `gn_ws`, `evonorm_s0`, `bgn` only" in props["groups"]["description"]
    assert "Default 8192" in props["precise_samples"]["description"]


def test_longest_label_fits_the_runs_table() -> None:
    # runs.variant is VARCHAR(100); the longest brn label (all four values at their widest) must fit.
    params = {"r_max": 1.0000000000000002, "d_max": 2.2250738585072014e-308, "warmup_steps": 99_999_999}
    label = catalogue.variant_label("brn", {**params, "ramp_steps": 99_999_999})
    assert len(label) <= 100, label
