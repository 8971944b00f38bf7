"""Tests for models/: norm layers against their definitions, and the networks built from them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.core import catalogue
from app.core.catalogue import CatalogueError
from models import build_model, create_norm_layer, get_norm_layer
from models.nets import BasicBlock
from models.norms import _NORM_LAYERS, is_norm_layer

BATCH_SIZES = (1, 2, 8)

# (arch, input_shape, build kwargs): small versions of every architecture.
NETS = [
    ("mlp", (64,), {}),
    ("mlp", (1, 8, 8), {"hidden": [32, 16]}),
    ("cnn", (1, 8, 8), {"width": 8}),
    ("cnn", (3, 32, 32), {}),
    ("resnet", (3, 32, 32), {"depth": 8, "width": 8}),
]

VARIANTS: list[tuple[str, dict[str, int | float | None]]] = [
    ("bn", {}),
    ("gn", {}),
    ("gn", {"groups": 2}),
    ("gn", {"group_size": 4}),
    ("ln", {}),
    ("in", {}),
    ("none", {}),
    ("none", {"groups": None}),
    ("bn_precise", {"precise_samples": 64}),
    ("brn", {}),
    ("brn", {"r_max": 2.0, "d_max": 1.0, "warmup_steps": 0, "ramp_steps": 0}),
    ("gn_ws", {}),
    ("gn_ws", {"group_size": 4}),
    ("frn", {}),
    ("evonorm_s0", {}),
    ("evonorm_s0", {"groups": 2}),
]
# The catalogue's order: the classic choices first, then the zoo (whose later additions append to it).
NORM_ORDER = ", ".join(catalogue.NORMS)
assert NORM_ORDER.startswith("bn, gn, ln, in, none, bn_precise, brn, gn_ws, frn, evonorm_s0")


def _randomize_affine(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()


def _group_norm_by_hand(
    x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = g.var(dim=2, unbiased=False, keepdim=True)
    y = ((g - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    affine_shape = (1, c) + (1,) * (x.dim() - 2)
    return y * weight.reshape(affine_shape) + bias.reshape(affine_shape)


def _norm_channels(model: nn.Module) -> list[int]:
    channels = []
    for m in model.modules():
        if is_norm_layer(m):
            channels.append(m.num_features if hasattr(m, "num_features") else m.num_channels)
    return channels


def _sites(arch: str, kwargs: dict) -> list[catalogue.NormSite]:
    return catalogue.norm_sites(arch, **{k: v for k, v in kwargs.items() if k in ("depth", "width", "hidden")})


# --- registry -------------------------------------------------------------------------------------------


def test_registry_covers_catalogue() -> None:
    assert set(_NORM_LAYERS) == set(catalogue.NORMS)


@pytest.mark.parametrize("name", sorted(catalogue.NORMS))
def test_norm_layer_init_and_rng(name: str) -> None:
    state = torch.get_rng_state()
    layer = create_norm_layer(name, 8)
    # Constructing a norm must not shift the global RNG, or conv init would differ by variant.
    assert torch.equal(torch.get_rng_state(), state)
    if name != "none":
        assert torch.equal(layer.weight, torch.ones(8))
    if name not in ("none", "rmsnorm"):  # RMSNorm scales only: no shift
        assert torch.equal(layer.bias, torch.zeros(8))
    assert get_norm_layer(name)(8).__class__ is layer.__class__


def test_unknown_norm_names_valid_choices() -> None:
    with pytest.raises(CatalogueError, match=f"unknown norm 'batchnorm'; valid choices: {NORM_ORDER}$"):
        get_norm_layer("batchnorm")
    with pytest.raises(CatalogueError, match=f"valid choices: {NORM_ORDER}$"):
        build_model("cnn", (3, 8, 8), 10, "layernorm", {})


def test_bad_params_raise() -> None:
    with pytest.raises(CatalogueError, match=r"does not take groups \(takes no parameters\)"):
        get_norm_layer("bn", groups=4)
    with pytest.raises(CatalogueError, match=r"does not take size \(takes groups, group_size\)"):
        get_norm_layer("gn", size=4)
    with pytest.raises(CatalogueError, match="must be an integer"):
        get_norm_layer("gn", groups="4")  # type: ignore[arg-type]
    with pytest.raises(CatalogueError, match="not both"):
        create_norm_layer("gn", 8, groups=2, group_size=4)
    with pytest.raises(CatalogueError, match="groups=3 does not divide a layer with 16 channels"):
        create_norm_layer("gn", 16, groups=3)


def test_bad_groups_name_the_layer() -> None:
    msg = r"groups=16 does not divide a layer with 8 channels \(layer 'stage0'\)"
    with pytest.raises(CatalogueError, match=msg):
        build_model("cnn", (3, 8, 8), 10, "gn", {"groups": 16}, width=8)
    msg = r"group_size 32 does not divide a layer with 16 channels \(layer 'stem'\)"
    with pytest.raises(CatalogueError, match=msg):
        build_model("resnet", (3, 32, 32), 10, "gn", {"group_size": 32}, depth=8)


def test_unknown_arch_and_bad_inputs() -> None:
    with pytest.raises(
        CatalogueError, match=f"unknown architecture 'vit'; valid choices: {', '.join(sorted(catalogue.ARCHS))}$"
    ):
        build_model("vit", (3, 32, 32), 10, "bn", {})
    with pytest.raises(CatalogueError, match="needs image inputs"):
        build_model("cnn", (64,), 10, "bn", {})
    with pytest.raises(CatalogueError, match="depth must be 6n\\+2"):
        build_model("resnet", (3, 32, 32), 10, "bn", {}, depth=10)
    with pytest.raises(CatalogueError, match="input shape"):
        build_model("mlp", (2, 8, 8, 3), 10, "bn", {})


# --- GroupNorm family against the definition ---------------------------------------------------------


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize(
    ("name", "params", "shape", "groups"),
    [
        ("gn", {"groups": 3}, (6, 4, 4), 3),
        ("gn", {"group_size": 2}, (6, 5, 3), 3),
        ("gn", {}, (64, 2, 2), 32),
        ("gn", {"groups": 4}, (8,), 4),
        ("ln", {}, (6, 4, 4), 1),
        ("ln", {}, (10,), 1),
        ("in", {}, (6, 4, 4), 6),
    ],
)
def test_group_norm_matches_definition(
    name: str, params: dict, shape: tuple[int, ...], groups: int, batch: int
) -> None:
    torch.manual_seed(batch)
    layer = create_norm_layer(name, shape[0], **params)
    assert layer.num_groups == groups
    _randomize_affine(layer)
    x = torch.randn(batch, *shape) * 3 + 1
    upstream = torch.randn(batch, *shape)

    x1 = x.clone().requires_grad_()
    (layer(x1) * upstream).sum().backward()
    x2 = x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    expected = _group_norm_by_hand(x2, groups, w2, b2, layer.eps)
    (expected * upstream).sum().backward()

    torch.testing.assert_close(layer(x), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, w2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, b2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("gn_params", "other"), [({"groups": 1}, "ln"), ({"groups": 12}, "in"), ({"group_size": 1}, "in")]
)
def test_gn_extremes_equal_ln_and_in(gn_params: dict, other: str) -> None:
    torch.manual_seed(0)
    gn = create_norm_layer("gn", 12, **gn_params)
    _randomize_affine(gn)
    ref = create_norm_layer(other, 12)
    ref.load_state_dict(gn.state_dict())
    x = torch.randn(4, 12, 5, 5)
    torch.testing.assert_close(gn(x), ref(x), rtol=0, atol=0)


# --- BatchNorm ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 4, 4), (2, 6, 3), (3, 6, 2, 2, 2)])
def test_batch_norm_train_matches_batch_statistics(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    bn = create_norm_layer("bn", 6)
    _randomize_affine(bn)
    bn.train()
    x = torch.randn(*shape) * 2 + 0.5
    dims = [0, *range(2, x.dim())]
    affine_shape = (1, 6) + (1,) * (x.dim() - 2)
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    weight, bias = bn.weight.reshape(affine_shape), bn.bias.reshape(affine_shape)
    expected = (x - mean) / torch.sqrt(var + bn.eps) * weight + bias

    torch.testing.assert_close(bn(x), expected, rtol=1e-5, atol=1e-5)
    # Running stats: momentum 0.1 from (0, 1), with the unbiased variance.
    assert bn.momentum == 0.1 and bn.eps == 1e-5
    torch.testing.assert_close(bn.running_mean, 0.1 * mean.flatten())
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * x.var(dim=dims, unbiased=True))
    assert int(bn.num_batches_tracked) == 1

    bn.eval()
    running_mean, running_var = bn.running_mean.reshape(affine_shape), bn.running_var.reshape(affine_shape)
    expected_eval = (x - running_mean) / torch.sqrt(running_var + bn.eps) * weight + bias
    torch.testing.assert_close(bn(x), expected_eval, rtol=1e-5, atol=1e-5)


def test_batch_norm_rejects_1d_input() -> None:
    with pytest.raises(ValueError, match="at least 2 dims"):
        create_norm_layer("bn", 6)(torch.randn(6))


@pytest.mark.parametrize("name", sorted(catalogue.NORMS))
def test_batch_independence(name: str) -> None:
    torch.manual_seed(0)
    layer = create_norm_layer(name, 8).train()
    x = torch.randn(8, 8, 3, 3)
    alone = layer(x[:1])
    together = layer(torch.cat([x[:1], torch.randn(7, 8, 3, 3) * 5 + 2]))[:1]
    independent = torch.allclose(alone, together, rtol=1e-5, atol=1e-6)
    assert independent == (not catalogue.NORMS[name].batch_dependent)


# --- networks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "shape", "kwargs"), NETS, ids=lambda v: str(v))
@pytest.mark.parametrize(("norm", "params"), VARIANTS, ids=lambda v: str(v))
def test_network_forward_backward(arch: str, shape: tuple[int, ...], kwargs: dict, norm: str, params: dict) -> None:
    sites = _sites(arch, kwargs)
    try:
        catalogue.check_variant(norm, params, sites)
    except CatalogueError:
        assert catalogue.NORMS[norm].needs_spatial and arch == "mlp"
        with pytest.raises(CatalogueError, match="needs spatial positions"):
            build_model(arch, shape, 10, norm, params, **kwargs)
        return
    torch.manual_seed(0)
    model = build_model(arch, shape, 10, norm, params, **kwargs).train()
    x = torch.randn(4, *shape)
    y = torch.randint(0, 10, (4,))
    logits = model(x)
    assert logits.shape == (4, 10)
    loss = nn.functional.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    # Eval mode runs too (BN switches to running statistics).
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize(
    ("arch", "shape", "kwargs", "norm"),
    [
        (*net, norm)
        for net in [*NETS, ("resnet", (3, 32, 32), {"depth": 14})]
        for norm in catalogue.NORMS
        # Norms that need spatial positions are tested to raise on the MLP elsewhere.
        if not (catalogue.NORMS[norm].needs_spatial and net[0] == "mlp")
    ],
)
def test_norm_sites_order(arch: str, shape: tuple[int, ...], kwargs: dict, norm: str) -> None:
    model = build_model(arch, shape, 10, norm, {}, **kwargs)
    assert _norm_channels(model) == [s.channels for s in _sites(arch, kwargs)]


def test_gn_groups_resolved_per_site() -> None:
    model = build_model("resnet", (3, 32, 32), 10, "gn", {"group_size": 4}, depth=8, width=8)
    norms = [m for m in model.modules() if is_norm_layer(m)]
    sites = catalogue.norm_sites("resnet", depth=8, width=8)
    assert [m.num_groups for m in norms] == [s.channels // 4 for s in sites]


@pytest.mark.parametrize(("arch", "shape", "kwargs"), NETS)
def test_same_seed_same_weights_across_norms(arch: str, shape: tuple[int, ...], kwargs: dict) -> None:
    weights = {}
    for norm, params in [("bn", {}), ("gn", {"groups": 2}), ("none", {})]:
        torch.manual_seed(123)
        model = build_model(arch, shape, 10, norm, params, **kwargs)
        weights[norm] = {
            name: t
            for name, t in model.state_dict().items()
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), (nn.Conv2d, nn.Linear))
        }
    assert weights["bn"]
    for norm in ("gn", "none"):
        assert weights[norm].keys() == weights["bn"].keys()
        for name, t in weights["bn"].items():
            assert torch.equal(weights[norm][name], t), (norm, name)


@pytest.mark.parametrize("zero_init_last", [True, False])
def test_resnet_zero_init_last(zero_init_last: bool) -> None:
    model = build_model("resnet", (3, 32, 32), 10, "bn", {}, depth=8, width=8, zero_init_last=zero_init_last)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3
    for block in blocks:
        assert torch.equal(block.norm1.weight, torch.ones(block.norm1.num_features))
        expected = torch.full_like(block.norm2.weight, 0.0 if zero_init_last else 1.0)
        assert torch.equal(block.norm2.weight, expected)
    # `none` has no affine weight to zero; building must still work.
    build_model("resnet", (3, 32, 32), 10, "none", {}, depth=8, width=8, zero_init_last=zero_init_last)


def test_resnet_shortcuts_have_no_norm() -> None:
    model = build_model("resnet", (3, 32, 32), 10, "bn", {}, depth=8, width=8)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert [b.shortcut is None for b in blocks] == [True, False, False]
    assert all(isinstance(b.shortcut, nn.Conv2d) for b in blocks[1:])


def test_cnn_downsamples_8x8_to_2x2() -> None:
    model = build_model("cnn", (1, 8, 8), 10, "bn", {}, width=8)
    assert model.features(torch.randn(2, 1, 8, 8)).shape == (2, 32, 2, 2)
