"""torchvision's networks with the zoo's norms: the torch-free catalogue describes exactly what torchvision builds
(norm sites, channels, spatial positions), refused norms are refused with their reason, every allowed norm trains
in a vmapped pack of 2 on CPU at 32×32, and images are fed at their own resolution (resize, crop) on the device."""

from __future__ import annotations

from typing import Any

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from torchvision.transforms.v2 import functional as TF  # noqa: E402

from app.core import catalogue  # noqa: E402
from app.core.budget import resolve_budget  # noqa: E402
from app.schemas.jobs import JobSpec, OptimizerSpec  # noqa: E402
from models import build_model  # noqa: E402
from models.norms import is_norm_layer  # noqa: E402
from tests.test_packing import Recorder  # noqa: E402
from workers.augment import Feed, epoch_crops  # noqa: E402
from workers.data import DeviceData  # noqa: E402
from workers.engine import Outcome, PackTrainer, RunConfig  # noqa: E402

CPU = torch.device("cpu")
TV_ARCHS = [a for a, info in catalogue.ARCHS.items() if info.torchvision]


def tiny_data(shape: tuple[int, int, int] = (3, 32, 32), n: int = 8, classes: int = 3, test: int = 0) -> DeviceData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % classes
    xt = torch.randint(0, 256, (test, *shape), generator=g, dtype=torch.uint8) if test else None
    return DeviceData(
        kind="image",
        x_train=x,
        y_train=y,
        x_val=x[:4].clone(),
        y_val=y[:4].clone(),
        mean=torch.full((1, shape[0], 1, 1), 127.5),
        std=torch.full((1, shape[0], 1, 1), 64.0),
        input_shape=shape,
        num_classes=classes,
        x_test=xt,
        y_test=None if xt is None else torch.arange(test) % classes,
    )


def run_config(arch: str, norm: str, seed: int, budget: dict[str, int], batch: int = 2, **kw: Any) -> RunConfig:
    opt = OptimizerSpec(lr=0.01).model_dump()
    return RunConfig(arch, norm, {}, batch, seed, budget, {}, opt, {}, **{"log_every_steps": 2, **kw})


def budget_for(data: DeviceData, epochs: int = 1, batch: int = 2) -> dict[str, int]:
    return resolve_budget(len(data.x_train), len(data.x_val), epochs, [batch])


# --- the catalogue is what torchvision builds ---------------------------------------------------------------


def measured_positions(model: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Each norm layer's (channels, H×W) from its real input, by forward pre-hooks."""
    seen: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, inputs, name=name: seen.__setitem__(
                name, (inputs[0].shape[1], inputs[0].shape[2] * inputs[0].shape[3])
            )
        )
        for name, m in model.named_modules()
        if is_norm_layer(m)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("arch", TV_ARCHS)
def test_catalogue_sites_are_torchvisions_norm_layers(arch: str) -> None:
    for shape in ((3, 32, 32), (1, 45, 37)):
        sites = catalogue.norm_sites(arch, input_shape=shape)
        model = build_model(arch, shape, 5, "gn", {"groups": 8})
        seen = measured_positions(model, shape)
        assert list(seen) == [s.layer for s in sites]
        assert seen == {s.layer: (s.channels, s.positions) for s in sites}
        assert all(s.spatial == (s.positions != 1) for s in sites)
        # The head is the last classifier layer, sized for the dataset's classes.
        head = model.get_submodule(catalogue.ARCHS[arch].head)
        assert isinstance(head, torch.nn.Linear) and head.out_features == 5
    # Without an input size the sites still carry the channels the API validates groupings against.
    assert [s.channels for s in catalogue.norm_sites(arch)] == [s.channels for s in sites]


def test_default_norm_layers_are_torchvisions() -> None:
    """With the architecture's own norm, the network is torchvision's: same state-dict keys and shapes, and for
    ResNet-18 with BatchNorm (same weights loaded) the same outputs."""
    tvm = torchvision.models
    for arch, norm in (("resnet18", "bn"), ("convnext_tiny", "ln_channel"), ("mobilenet_v3_small", "bn")):
        ours = build_model(arch, (3, 32, 32), 1000, norm, {})
        theirs = getattr(tvm, arch)(weights=None)
        ref = {k: v.shape for k, v in theirs.state_dict().items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == ref, arch
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-4, atol=1e-4)


def test_refused_norms_say_why() -> None:
    refused = {(a, n) for a in TV_ARCHS for n in catalogue.ARCHS[a].refuses}
    assert ("resnet18", "frn") in refused and ("convnext_tiny", "bn_frozen") in refused
    for arch, norm in refused:
        with pytest.raises(catalogue.CatalogueError, match=f"norm '{norm}' does not make sense in {arch}: "):
            catalogue.check_variant(norm, {}, catalogue.norm_sites(arch), arch=arch)
    # A norm that needs spatial positions at a 1×1 site: named, with what to do.
    with pytest.raises(catalogue.CatalogueError, match="layer 'classifier.0' sees a single position"):
        catalogue.check_variant("in", {}, catalogue.norm_sites("convnext_tiny"), arch="convnext_tiny")
    with pytest.raises(catalogue.CatalogueError, match="layer 'layer4.0.bn1' sees a single position"):
        catalogue.check_variant("in", {}, catalogue.norm_sites("resnet18", input_shape=(3, 32, 32)), arch="resnet18")
    catalogue.check_variant("in", {}, catalogue.norm_sites("resnet18", input_shape=(3, 64, 64)), arch="resnet18")
    # GroupNorm groupings are validated against every site, MobileNet's 72 channels included.
    with pytest.raises(catalogue.CatalogueError, match=r"groups=16 does not divide a layer with 72 channels"):
        catalogue.check_variant("gn", {"groups": 16}, catalogue.norm_sites("mobilenet_v3_small"))
    with pytest.raises(catalogue.CatalogueError, match="needs images of at least 32×32"):
        catalogue.norm_sites("convnext_tiny", input_shape=(3, 28, 28))
    # Pretrained-only norms need `init`.
    with pytest.raises(ValueError, match="set init.weights_id"):
        JobSpec(dataset_id="d", model={"arch": "resnet18"}, variants=[{"norm": "bn_eval"}], batch_sizes=[2])


# --- packs of 2 under vmap ---------------------------------------------------------------------------------


def allowed_norms(arch: str) -> list[str]:
    sites = catalogue.norm_sites(arch, input_shape=(3, 32, 32))
    out = []
    for norm, info in catalogue.NORMS.items():
        if info.needs_init:
            continue
        try:
            catalogue.check_variant(norm, {}, sites, arch=arch)
        except catalogue.CatalogueError:
            continue
        out.append(norm)
    return out


# Slow: six trainings of a torchvision network (ResNet-18: about 10 s of one CPU core, the fast tier's largest).
@pytest.mark.slow
@pytest.mark.parametrize("arch", TV_ARCHS)
def test_a_pack_of_two_trains_like_two_packs_of_one(arch: str) -> None:
    """vmap over torchvision modules (in-place activations, MobileNet's squeeze-excitation, ConvNeXt's layer
    scale and permutes): two seeds packed give what each gives alone, for the architecture's own norm and GN.
    From scratch on noise the BatchNorm networks' gradients are in the thousands, which amplifies float32
    round-off from step 2 on (seen: 1e-4 in the first gradient, 17% in ResNet-50's third loss), so with the
    network's own norm the first step is compared to round-off; with GroupNorm (no batch coupling) every
    step is. Even the first BN gradient's round-off depends on the CPU's kernels: 2.3e-3 for ResNet-50 on an
    AMD EPYC (1e-4 elsewhere), so BN gradient norms get 1e-2; a pack that mixed its models' batch statistics
    would move the first loss itself, which keeps 1e-3."""
    own = "ln_channel" if arch == "convnext_tiny" else "bn"
    data = tiny_data((3, 32, 32) if own == "ln_channel" else (3, 64, 64), n=16)
    budget = budget_for(data, batch=4)
    for norm in dict.fromkeys((own, "gn")):
        cfgs = [run_config(arch, norm, s, budget, batch=4, log_every_steps=1) for s in (0, 1)]
        recs = [Recorder(), Recorder()]
        packed = PackTrainer(cfgs, data, CPU, recs).run()
        for cfg, out, rec in zip(cfgs, packed, recs, strict=True):
            assert isinstance(out, Outcome) and out.status == "succeeded", out
            ref = Recorder()
            alone = PackTrainer([cfg], data, CPU, [ref]).run()[0]
            assert isinstance(alone, Outcome)
            got, want = ({(p.step, p.name): p.value for p in r.points} for r in (rec, ref))
            steps = (1,) if norm == "bn" else (1, 2, 3, 4)
            for step in steps:
                # Gradient norms amplify round-off most (0.2% by ResNet-50's third GN step).
                grad_rel = 1e-3 if step == 1 and norm != "bn" else 1e-2
                for name, rel in (("train_loss_step", 1e-3), ("grad_norm", grad_rel)):
                    assert got[(step, name)] == pytest.approx(want[(step, name)], rel=rel), (norm, step, name)


# Slow: a network per norm (about 2 s each on one CPU thread, 11 norms for ResNet-18).
@pytest.mark.slow
@pytest.mark.parametrize("arch", TV_ARCHS)
def test_every_allowed_norm_trains_a_packed_step(arch: str) -> None:
    """Every norm the catalogue allows besides the architecture's own trains a packed step of two seeds to finite
    numbers (ResNet-18 and MobileNet: all of them; the big ones: GN)."""
    own = "ln_channel" if arch == "convnext_tiny" else "bn"
    others = allowed_norms(arch) if arch in ("resnet18", "mobilenet_v3_small") else ["gn"]
    data = tiny_data()
    small = {**budget_for(data), "samples_per_epoch": 2, "total_samples": 2}
    for norm in others:
        if norm == own:
            continue
        outs = PackTrainer([run_config(arch, norm, s, small) for s in (0, 1)], data, CPU, [Recorder(), Recorder()])
        for out in outs.run():
            assert isinstance(out, Outcome) and out.status == "succeeded", (norm, out)
            assert all(torch.isfinite(torch.tensor(v)) for v in out.final_metrics.values()), norm


# --- inputs at their own resolution ------------------------------------------------------------------------


def test_feed_resizes_and_crops_as_torchvision() -> None:
    x = torch.randn(3, 2, 40, 60)
    feed = Feed.of({"resize": 20, "crop": 16, "random_crop": True}, (2, 40, 60), "image")
    assert feed is not None and feed.size == (20, 30) and feed.room == (4, 14)
    resized = TF.resize(x, [20], antialias=True)
    torch.testing.assert_close(feed.eval(x), TF.center_crop(resized, [16]), rtol=1e-5, atol=1e-5)
    crops = epoch_crops(feed, seed=3, epoch=1, n=3, device=CPU)
    assert crops is not None
    dy, dx = crops
    out = feed.train(x, dy, dx)
    for i in range(3):
        expect = TF.crop(resized[i], int(dy[i]), int(dx[i]), 16, 16)
        torch.testing.assert_close(out[i], expect, rtol=1e-5, atol=1e-5)
    # Per seed and epoch, the same draws: every variant sees the same crops.
    again = epoch_crops(feed, seed=3, epoch=1, n=3, device=CPU)
    assert again is not None and torch.equal(again[0], dy) and torch.equal(again[1], dx)
    assert Feed.of({}, (2, 40, 60), "image") is None
    with pytest.raises(catalogue.CatalogueError, match="input.crop 50 is larger than the images as fed"):
        Feed.of({"crop": 50}, (2, 40, 60), "image")


@pytest.mark.slow
def test_runs_feed_resized_crops_and_report_the_test_split() -> None:
    """Stored at 48×40, fed as random 32×32 crops of a 36-pixel resize (centre crops to evaluate); packed seeds
    train as alone; the test split gives test_acc/test_loss at the end only."""
    data = tiny_data((3, 48, 40), test=6)
    budget = budget_for(data, epochs=2)
    spec = {"resize": 36, "crop": 32, "random_crop": True}
    cfgs = [run_config("resnet18", "gn", s, budget, input=spec) for s in (0, 1)]
    recs = [Recorder(), Recorder()]
    packed = PackTrainer(cfgs, data, CPU, recs).run()
    for cfg, out, rec in zip(cfgs, packed, recs, strict=True):
        assert isinstance(out, Outcome) and out.status == "succeeded"
        assert {"test_acc", "test_loss"} <= out.final_metrics.keys()
        assert [p.epoch for p in rec.points if p.name == "test_acc"] == [2.0]
        alone = PackTrainer([cfg], data, CPU, [Recorder()]).run()[0]
        assert isinstance(alone, Outcome)
        for name in ("train_loss", "val_loss", "test_loss"):
            assert out.final_metrics[name] == pytest.approx(alone.final_metrics[name], rel=1e-3, abs=1e-4), name
    assert packed[0].final_metrics["train_loss"] != packed[1].final_metrics["train_loss"]  # type: ignore[union-attr]
    without = PackTrainer([run_config("resnet18", "gn", 0, budget_for(tiny_data()))], tiny_data(), CPU, [Recorder()])
    out = without.run()[0]
    assert isinstance(out, Outcome) and "test_acc" not in out.final_metrics


def test_fed_shape() -> None:
    assert catalogue.fed_shape((3, 100, 200), 64, None) == (3, 64, 128)
    assert catalogue.fed_shape((3, 200, 100), 64, 56) == (3, 56, 56)
    assert catalogue.fed_shape((3, 30, 40), None, None) == (3, 30, 40)
    with pytest.raises(catalogue.CatalogueError, match="images only"):
        catalogue.fed_shape((64,), 32, None)


@pytest.mark.parametrize("arch", TV_ARCHS)
def test_memory_estimate_counts_the_real_parameters_and_buffers(arch: str) -> None:
    """The torch-free admission estimate (app.core.memory) knows each torchvision network's exact size, for RGB
    and grayscale inputs and any classes, with every norm the architecture allows."""
    from app.core import memory

    for shape in ((3, 64, 64), (1, 32, 32)):
        net = memory.network(arch, shape, 7)
        norms = ["bn", "gn"] + (["bn_frozen", "bn_eval"] if arch != "convnext_tiny" else ["ln_channel"])
        for norm in norms:
            model = build_model(arch, shape, 7, norm, {})
            assert net.parameters(norm) == sum(p.numel() for p in model.parameters()), (norm, shape)
            assert net.buffer_bytes(norm) == sum(b.numel() * b.element_size() for b in model.buffers()), norm
