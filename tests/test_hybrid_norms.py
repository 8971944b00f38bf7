"""Hybrid norms (issue 13 §3): Switchable Normalization and Batch Group Normalization against their formulas
written out by hand at batch 1, 2 and 8, their running statistics, the catalogue, the pack engine (vmap over
functional_call), and the learned mixing weights reported at the end of a run and in the report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from app.core import catalogue, memory
from app.core.catalogue import CatalogueError
from models import build_model, create_norm_layer
from models.hybrid_norms import BatchGroupNorm, SwitchableNorm, switchable_mixtures
from tests.test_norm_zoo import Params, check_against_formula, per_channel, randomize
from tests.vmapped_pack import assert_pack_equals_each_model
from workers.epoch_metrics import mixture_metrics

BATCH_SIZES = (1, 2, 8)
EPS = 1e-5


def _stats(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over `dims`, by the definition (sum / count), kept broadcastable."""
    count = 1
    for d in dims:
        count *= x.shape[d]
    mean = x.sum(dim=dims, keepdim=True) / count
    var = ((x - mean) ** 2).sum(dim=dims, keepdim=True) / count
    return mean, var


# --- Switchable Normalization --------------------------------------------------------------------------------


def _sn_reference(x: torch.Tensor, p: Params) -> torch.Tensor:
    """Luo et al. 2019, eq. (1)-(3): per-statistic means and variances mixed by softmax weights."""
    spatial = tuple(range(2, x.dim()))
    mean_bn, var_bn = _stats(x, (0, *spatial))
    mean_ln, var_ln = _stats(x, (1, *spatial))
    if spatial:
        mean_in, var_in = _stats(x, spatial)
        wm, wv = torch.softmax(p["mean_weight"], 0), torch.softmax(p["var_weight"], 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    else:  # flat inputs: LN and BN only (the official SwitchNorm1d)
        wm, wv = torch.softmax(p["mean_weight"][1:], 0), torch.softmax(p["var_weight"][1:], 0)
        mean = wm[0] * mean_ln + wm[1] * mean_bn
        var = wv[0] * var_ln + wv[1] * var_bn
    y = (x - mean) / torch.sqrt(var + EPS)
    return y * per_channel(p["weight"], x) + per_channel(p["bias"], x)


def _cases(channels: int) -> list[tuple[tuple[int, ...], int]]:
    """(per-sample shape, batch): (C, H, W), (C, L) and flat (C,) where BN statistics exist (2+ values)."""
    shapes = [(channels, 3, 4), (channels, 5), (channels,)]
    return [(s, b) for s in shapes for b in BATCH_SIZES if len(s) > 1 or b > 1]


@pytest.mark.parametrize(("shape", "batch"), _cases(6))
def test_switchable_matches_its_formula(shape: tuple[int, ...], batch: int) -> None:
    torch.manual_seed(0)
    layer = SwitchableNorm(shape[0]).train()
    randomize(layer)
    x = torch.randn(batch, *shape) * 3 + 1
    check_against_formula(layer, _sn_reference, x)


def test_switchable_at_batch_1_uses_the_samples_own_statistics_for_bn() -> None:
    """At batch 1 BN's statistics over one sample are IN's: moving mixing weight between them changes nothing."""
    torch.manual_seed(0)
    layer = SwitchableNorm(4).train()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([2.0, 0.0, -2.0]))
        layer.var_weight.copy_(torch.tensor([2.0, 0.0, -2.0]))
    a = layer(x)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([-2.0, 0.0, 2.0]))
        layer.var_weight.copy_(torch.tensor([-2.0, 0.0, 2.0]))
    torch.testing.assert_close(layer(x), a)
    # ... and the gradient reaches IN's and BN's logits equally from equal shares.
    layer = SwitchableNorm(4).train()
    (layer(x) * torch.randn_like(x)).sum().backward()
    assert layer.mean_weight.grad is not None and layer.var_weight.grad is not None
    torch.testing.assert_close(layer.mean_weight.grad[0], layer.mean_weight.grad[2])
    torch.testing.assert_close(layer.var_weight.grad[0], layer.var_weight.grad[2])


def test_switchable_running_statistics_and_evaluation() -> None:
    torch.manual_seed(0)
    layer = SwitchableNorm(3, momentum=0.1)
    randomize(layer)
    x = torch.randn(8, 3, 4, 4) * 2 + 5
    layer.train()(x)
    flat = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(layer.running_mean, 0.1 * flat.mean(1))
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * flat.var(1, unbiased=True))
    assert int(layer.num_batches_tracked) == 1
    # Evaluation: IN and LN from the input, BN's part from the running statistics.
    layer.eval()
    p = dict(layer.named_parameters())
    mean_in, var_in = _stats(x, (2, 3))
    mean_ln, var_ln = _stats(x, (1, 2, 3))
    wm, wv = torch.softmax(p["mean_weight"], 0), torch.softmax(p["var_weight"], 0)
    mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * per_channel(layer.running_mean, x)
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * per_channel(layer.running_var, x)
    expected = (x - mean) / torch.sqrt(var + EPS) * per_channel(p["weight"], x) + per_channel(p["bias"], x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    assert int(layer.num_batches_tracked) == 1


def test_switchable_refuses_a_single_value_per_channel_in_training() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SwitchableNorm(4).train()(torch.randn(1, 4))
    SwitchableNorm(4).eval()(torch.randn(1, 4))  # evaluation has running statistics


def test_switchable_mixtures_report_the_shares() -> None:
    model = build_model("mlp", (10,), 3, "switchable", {}, hidden=[8, 8])
    model(torch.randn(4, 10))
    mix = switchable_mixtures(model)
    assert list(mix) == ["features.2", "features.5"]
    for shares in mix.values():  # flat layers: IN gets nothing, LN and BN half each at init
        assert shares == pytest.approx(
            {"mean_in": 0.0, "mean_ln": 0.5, "mean_bn": 0.5, "var_in": 0.0, "var_ln": 0.5, "var_bn": 0.5}
        )
    cnn = build_model("cnn", (1, 8, 8), 3, "switchable", {}, width=4)
    with torch.no_grad():
        cnn.features[1].mean_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
    cnn(torch.randn(2, 1, 8, 8))
    shares = switchable_mixtures(cnn)["features.1"]
    e = torch.e
    assert shares["mean_bn"] == pytest.approx(e / (2 + e)) and shares["var_in"] == pytest.approx(1 / 3)
    metrics = mixture_metrics(switchable_mixtures(cnn))
    assert metrics["sn_mix/features.1/mean_bn"] == pytest.approx(e / (2 + e))
    assert len(metrics) == 3 * 6 and all(len(k) <= 64 for k in metrics)
    long = mixture_metrics({"x" * 80: {"mean_bn": 1.0}})
    assert list(long) == ["sn_mix/#0/mean_bn"]


# --- Batch Group Normalization ----------------------------------------------------------------------------------


def _bgn_reference(groups: int) -> Callable[[torch.Tensor, Params], torch.Tensor]:
    def formula(x: torch.Tensor, p: Params) -> torch.Tensor:
        n, c = x.shape[:2]
        per = c // groups
        parts = []
        for g in range(groups):
            chunk = x[:, g * per : (g + 1) * per]
            mean, var = _stats(chunk, tuple(range(x.dim())))  # over the batch, the group's channels, positions
            parts.append((chunk - mean) / torch.sqrt(var + EPS))
        return torch.cat(parts, 1) * per_channel(p["weight"], x) + per_channel(p["bias"], x)

    return formula


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("shape", [(8, 3, 4), (8, 6), (8,)])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_bgn_matches_its_formula(batch: int, shape: tuple[int, ...], groups: int) -> None:
    torch.manual_seed(0)
    layer = BatchGroupNorm(shape[0], groups=groups).train()
    randomize(layer)
    x = torch.randn(batch, *shape) * 2 - 1
    check_against_formula(layer, _bgn_reference(groups), x)


@pytest.mark.parametrize("batch", [2, 8])
def test_bgn_with_one_channel_per_group_is_batchnorm(batch: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, 6, 3, 3)
    bgn, bn = BatchGroupNorm(6, groups=6).train(), create_norm_layer("bn", 6).train()
    torch.testing.assert_close(bgn(x), bn(x))
    torch.testing.assert_close(bgn.running_mean, bn.running_mean)
    torch.testing.assert_close(bgn.running_var, bn.running_var)
    torch.testing.assert_close(bgn.eval()(x), bn.eval()(x))


def test_bgn_at_batch_1_is_groupnorm_in_training() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(BatchGroupNorm(8, groups=2).train()(x), F.group_norm(x, 2, eps=EPS))


def test_bgn_running_statistics_are_its_groups() -> None:
    torch.manual_seed(0)
    layer = BatchGroupNorm(4, groups=2)
    x = torch.randn(8, 4, 3) * 3 + 2
    layer.train()(x)
    for g in range(2):
        values = x[:, 2 * g : 2 * g + 2].flatten()
        torch.testing.assert_close(layer.running_mean[2 * g : 2 * g + 2], 0.1 * values.mean().expand(2))
        torch.testing.assert_close(layer.running_var[2 * g : 2 * g + 2], 0.9 + 0.1 * values.var().expand(2))
    layer.eval()
    expected = (x - per_channel(layer.running_mean, x)) / torch.sqrt(per_channel(layer.running_var, x) + EPS)
    torch.testing.assert_close(layer(x), expected)


# --- catalogue ----------------------------------------------------------------------------------------------------


def test_catalogue_entries() -> None:
    assert catalogue.NORMS["switchable"].batch_dependent and catalogue.NORMS["bgn"].batch_dependent
    assert not catalogue.NORMS["switchable"].needs_spatial
    assert catalogue.NORMS["bgn"].params == ("groups",)
    assert catalogue.variant_label("bgn", {"groups": 4}) == "bgn(4)"
    assert catalogue.variant_label("switchable", {}) == "switchable"
    with pytest.raises(CatalogueError, match=r"bgn groups=3 does not divide a layer with 8 channels"):
        build_model("cnn", (1, 8, 8), 10, "bgn", {"groups": 3}, width=8)
    with pytest.raises(CatalogueError, match=r"does not take groups"):
        catalogue.check_variant("switchable", {"groups": 2}, catalogue.norm_sites("cnn"))


@pytest.mark.parametrize("norm", ["switchable", "bgn"])
def test_memory_counts_the_parameters_and_buffers(norm: str) -> None:
    for arch, shape, kw in [("mlp", (12,), {"hidden": [16, 8]}), ("resnet", (3, 8, 8), {"depth": 8, "width": 8})]:
        model = build_model(arch, shape, 5, norm, {}, **kw)
        net = memory.network(arch, shape, 5, **kw)
        assert net.parameters(norm) == sum(p.numel() for p in model.parameters())
        assert net.buffer_bytes(norm) == sum(b.numel() * b.element_size() for b in model.buffers())


# --- the pack engine: vmap over functional_call -----------------------------------------------------------------


@pytest.mark.parametrize(("norm", "params"), [("switchable", {}), ("bgn", {"groups": 2})])
@pytest.mark.parametrize(("arch", "shape"), [("cnn", (1, 8, 8)), ("mlp", (10,))])
def test_vmapped_functional_call_equals_each_model(
    norm: str, params: dict[str, Any], arch: str, shape: tuple[int, ...]
) -> None:
    """Stacked models under vmap(functional_call), as workers.packing trains them: the same outputs, gradients
    and running statistics as each model alone, in training and evaluation."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = build_model(arch, shape, 4, norm, params, width=4, hidden=[8]).train()
        _randomize_mix(m, seed)
        models.append(m)
    base = build_model(arch, shape, 4, norm, params, width=4, hidden=[8]).to("meta").train()
    x = torch.randn(3, 4, *shape)
    fwd, stacked_params, buffers = assert_pack_equals_each_model(models, base, x, rtol=1e-5, atol=1e-5)
    base.eval()
    out = vmap(fwd, in_dims=(0, 0, None))(stacked_params, buffers, x[0])
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m.eval()(x[0]), rtol=1e-5, atol=1e-5)


def _randomize_mix(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mean_weight", "var_weight")):
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.slow
@pytest.mark.parametrize(("norm", "params"), [("switchable", {}), ("bgn", {"groups": 4})])
def test_the_pack_engine_trains_hybrids_as_the_oracle_and_reports_the_shares(
    digits: tuple[Any, dict[str, int]], norm: str, params: dict[str, Any]
) -> None:
    """Two seeds packed (vmap over functional_call) train as the eager oracle does, and a switchable run's
    finals carry every layer's learned shares, which moved from their equal start."""
    from tests.test_packing import Recorder, assert_same_run, config, single
    from workers.engine import Outcome, PackTrainer

    data, budget = digits
    cfgs = [config(budget, arch="cnn", norm=norm, norm_params=params, batch_size=32, seed=s) for s in (0, 1)]
    recs = [Recorder() for _ in cfgs]
    packed = PackTrainer(cfgs, data, torch.device("cpu"), recs).run()
    for cfg, out, rec in zip(cfgs, packed, recs, strict=True):
        assert isinstance(out, Outcome) and out.status == "succeeded"
        ref, ref_rec = single(cfg, data)
        assert_same_run(ref, ref_rec, out, rec)
        mix = {k: v for k, v in out.final_metrics.items() if k.startswith("sn_mix/")}
        if norm != "switchable":
            assert not mix
            continue
        assert len(mix) == 3 * 6  # the CNN's three norm layers, six shares each
        for k, v in mix.items():
            assert v == pytest.approx(ref.final_metrics[k], abs=1e-3), k
        for layer in ("features.1", "features.4", "features.7"):
            means = [mix[f"sn_mix/{layer}/mean_{s}"] for s in ("in", "ln", "bn")]
            assert sum(means) == pytest.approx(1.0) and means != pytest.approx([1 / 3] * 3, abs=1e-6)


def test_the_report_shows_the_learned_shares_per_layer_and_batch_size() -> None:
    from types import SimpleNamespace

    from app.services.report import switchable_mixtures_section

    def run(batch: int, seed: int, bn: float) -> SimpleNamespace:
        rest = (1.0 - bn) / 2
        shares = {f"{p}_{s}": v for p in ("mean", "var") for s, v in (("bn", bn), ("in", rest), ("ln", rest))}
        finals = {"val_acc": 0.9, **mixture_metrics({"features.1": shares, "features.4": shares})}
        return SimpleNamespace(variant="switchable", batch_size=batch, seed=seed, final_metrics=finals)

    runs = [
        run(2, 0, 0.1),
        run(2, 1, 0.3),
        run(32, 0, 0.8),
        SimpleNamespace(variant="bn", batch_size=2, final_metrics={}),
    ]
    html = switchable_mixtures_section(runs)
    assert 'id="switchable-mixtures"' in html
    assert "switchable at batch 2: BN 20% of the mean and 20% of the variance" in html  # mean over seeds and layers
    assert "switchable at batch 32: BN 80% of the mean" in html
    assert html.count("<tr><td") == 2 and "<b>BN 80%</b>" in html and "<b>IN 40%</b>" in html
    assert switchable_mixtures_section([SimpleNamespace(variant="bn", batch_size=2, final_metrics=None)]) == ""
