"""Fine-tuning from uploaded weights: the fine-tuning norms of the zoo against their formulas, what a safetensors
upload transfers into each variant (and what it cannot), the seeded head, the backbone learning-rate multiplier
in the pack engine, and the test split reported at the end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")
safetensors_torch = pytest.importorskip("safetensors.torch")

from torchvision.models.convnext import LayerNorm2d  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from app.core import catalogue  # noqa: E402
from app.core.dataset_format import CanonicalDataset, save_canonical  # noqa: E402
from models import create_norm_layer  # noqa: E402
from tests.test_torchvision_archs import Recorder, budget_for, run_config, tiny_data  # noqa: E402
from workers.data import load_device_data  # noqa: E402
from workers.engine import Outcome, PackTrainer  # noqa: E402
from workers.run_config import build_run_model_and_init  # noqa: E402

CPU = torch.device("cpu")


def trained_bn(num_features: int = 6) -> nn.BatchNorm2d:
    """A BatchNorm2d with non-trivial statistics and affine, as pretrained ones are."""
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(num_features)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 3.0)
        bn.num_batches_tracked.fill_(100)
    return bn


# --- the fine-tuning norms against their formulas ----------------------------------------------------------


def test_bn_frozen_is_frozen_batchnorm() -> None:
    bn = trained_bn()
    frozen = create_norm_layer("bn_frozen", 6)
    frozen.load_state_dict(bn.state_dict())  # BatchNorm's state dict, num_batches_tracked included
    assert list(frozen.parameters()) == []  # nothing trains
    x = torch.randn(4, 6, 5, 5)
    formula = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-5)
    formula = formula * bn.weight.detach().view(1, -1, 1, 1) + bn.bias.detach().view(1, -1, 1, 1)
    reference = FrozenBatchNorm2d(6)
    reference.load_state_dict(bn.state_dict())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    for mode in (True, False):
        out = frozen.train(mode)(x)
        torch.testing.assert_close(out, formula, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, frozen.state_dict()[k]) for k, v in before.items())
    assert catalogue.NORMS["bn_frozen"].needs_init and not catalogue.NORMS["bn_frozen"].batch_dependent


def test_bn_eval_is_batchnorm_in_eval_mode_with_a_trainable_affine() -> None:
    bn = trained_bn()
    layer = create_norm_layer("bn_eval", 6)
    layer.load_state_dict(bn.state_dict())
    x = torch.randn(4, 6, 5, 5)
    out = layer.train()(x)  # training mode, and still the running statistics
    torch.testing.assert_close(out, bn.eval()(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.running_var, bn.running_var)
    out.square().sum().backward()
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == {"weight", "bias"}
    # Each sample's output is its own: the batch does not matter.
    torch.testing.assert_close(layer(x[:1]), out[:1].detach(), rtol=1e-5, atol=1e-5)


def test_ln_channel_is_convnexts_layernorm() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8, 4, 5)
    ours = create_norm_layer("ln_channel", 8)
    reference = LayerNorm2d(8, eps=1e-6)
    with torch.no_grad():
        for layer in (ours, reference):
            layer.weight.copy_(torch.linspace(0.5, 2, 8))
            layer.bias.copy_(torch.linspace(-1, 1, 8))
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, correction=0, keepdim=True)
    formula = (x - mean) / torch.sqrt(var + 1e-6) * ours.weight.view(1, -1, 1, 1) + ours.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ours(x), formula, rtol=1e-5, atol=1e-5)


# --- loading an upload ------------------------------------------------------------------------------------


def upload(tmp_path: Path, norm: str = "bn", classes: int = 1000) -> tuple[Path, dict[str, torch.Tensor]]:
    """torchvision's ResNet-18 with `norm` (random, with BN statistics moved off 0/1), saved as safetensors."""
    torch.manual_seed(42)
    if norm == "bn":
        net = torchvision.models.resnet18(weights=None, num_classes=classes)
    else:
        net = torchvision.models.resnet18(
            weights=None, num_classes=classes, norm_layer=lambda c: nn.GroupNorm(min(32, c), c)
        )
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_mean") or name.endswith("bias"):
                t.normal_()
            elif name.endswith("running_var") or (t.dim() == 1 and name.endswith("weight")):
                t.uniform_(0.5, 2.0)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"resnet18-{norm}.safetensors"
    safetensors_torch.save_file(state, str(path))
    return path, state


def finetune_config(path: Path, norm: str, seed: int = 0, mult: float = 1.0, **kw: Any) -> Any:
    data = tiny_data()
    init = {"weights_id": "w1", "backbone_lr_mult": mult, "path": str(path)}
    return run_config("resnet18", norm, seed, budget_for(data), init=init, **kw), data


@pytest.mark.parametrize("norm", ["bn", "bn_frozen", "bn_eval", "gn", "bn_precise"])
def test_an_upload_transfers_what_each_variant_can_take(tmp_path: Path, norm: str) -> None:
    path, state = upload(tmp_path)
    cfg, data = finetune_config(path, norm, seed=3)
    model, record = build_run_model_and_init(cfg, data, CPU)
    own = model.state_dict()
    # A backbone parameter equals the upload before training.
    for key in ("conv1.weight", "layer3.1.conv2.weight", "layer4.0.downsample.0.weight"):
        assert torch.equal(own[key], state[key]), key
    bn_family = norm in catalogue.BN_FAMILY
    for key in ("bn1.running_mean", "layer2.0.bn2.running_var"):
        assert (key in own and torch.equal(own[key], state[key])) == bn_family, key
    affine = torch.equal(own["layer1.0.bn1.weight"], state["layer1.0.bn1.weight"])
    assert affine == bn_family
    if not bn_family:  # GroupNorm: a fresh affine, statistics computed per sample
        assert torch.equal(own["layer1.0.bn1.weight"], torch.ones(64))
    # The head: re-initialised for the dataset's classes, seeded, the same for every variant.
    assert own["fc.weight"].shape == (data.num_classes, 512)
    reference, _ = build_run_model_and_init(replace(cfg, norm="gn"), data, CPU)
    assert torch.equal(own["fc.weight"], reference.state_dict()["fc.weight"])
    other_seed, _ = build_run_model_and_init(replace(cfg, seed=4), data, CPU)
    assert not torch.equal(own["fc.weight"], other_seed.state_dict()["fc.weight"])
    assert record is not None and record["weights_id"] == "w1" and record["head"].startswith("re-initialised for 3")
    expected = {"conv weights"} | ({"bn affine", "bn statistics"} if bn_family else set())
    assert set(record["transferred"]) == expected
    if not bn_family:
        assert any(t.startswith("bn statistics") for t in record["not_transferred"])


def test_gn_takes_pretrained_gn_weights_and_frozen_bn_needs_statistics(tmp_path: Path) -> None:
    path, state = upload(tmp_path, norm="gn")
    cfg, data = finetune_config(path, "gn")
    model, record = build_run_model_and_init(cfg, data, CPU)
    assert torch.equal(model.state_dict()["layer1.0.bn1.weight"], state["layer1.0.bn1.weight"])
    assert record is not None and "gn affine" in record["transferred"] and record["upload_norm"] == "gn"
    with pytest.raises(ValueError, match="bn_frozen keeps pretrained BatchNorm statistics"):
        build_run_model_and_init(replace(cfg, norm="bn_frozen"), data, CPU)


def test_grayscale_data_sum_the_pretrained_rgb_filters(tmp_path: Path) -> None:
    path, state = upload(tmp_path)
    cfg, _ = finetune_config(path, "bn")
    data = tiny_data((1, 32, 32))
    model, record = build_run_model_and_init(cfg, data, CPU)
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    assert record is not None and "first conv summed over RGB for 1-channel input" in record["transferred"]


class Keeper(Recorder):
    """Keeps the checkpoints too."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: list[Any] = []

    def report(self, points: list[Any], progress: Any, checkpoint: Any = None) -> None:
        super().report(points, progress, checkpoint)
        if checkpoint is not None:
            self.checkpoints.append(checkpoint)


def test_backbone_lr_mult_scales_the_backbones_first_update(tmp_path: Path) -> None:
    """The first SGD update is lr·(g + wd·p) per parameter: with the multiplier, the backbone's is that many
    times smaller and the head's unchanged. Read from the checkpoint after a one-step first epoch."""
    path, _ = upload(tmp_path)
    updates = {}
    for mult in (1.0, 0.1):
        cfg, data = finetune_config(path, "gn", mult=mult)
        budget = {**cfg.budget, "epochs": 2, "samples_per_epoch": 2, "total_samples": 4}
        cfg = replace(cfg, budget=budget)
        start, _ = build_run_model_and_init(cfg, data, CPU)
        rec = Keeper()
        trainer = PackTrainer([cfg], data, CPU, [rec])
        out = trainer.run()[0]
        assert isinstance(out, Outcome) and out.status == "succeeded"
        after = rec.checkpoints[0].model
        updates[mult] = {k: after[k] - v for k, v in start.state_dict().items() if v.is_floating_point()}
        env = trainer.execution(0)
        assert env["init"]["transferred"] == ["conv weights"]
        assert env["init"].get("backbone_lr_mult", 1.0) == mult
    # Updates are differences of float32 parameters: compared to round-off of the parameters' size.
    for key, mult in (
        ("conv1.weight", 0.1),
        ("layer4.1.conv2.weight", 0.1),
        ("layer1.0.bn1.bias", 0.1),
        ("fc.weight", 1),
    ):
        full = updates[1.0][key]
        assert full.abs().max() > 1e-6, (key, float(full.abs().max()))
        tol = 1e-7 * float(full.abs().max()) + 1e-8
        torch.testing.assert_close(updates[0.1][key], mult * full, rtol=1e-3, atol=tol, msg=key)


# --- the test split -----------------------------------------------------------------------------------------


def test_the_test_split_is_loaded_beside_validation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ds = CanonicalDataset(
        kind="image",
        x=rng.integers(0, 255, (10, 1, 4, 4), dtype=np.uint8),
        y=np.arange(10) % 2,
        x_val=rng.integers(0, 255, (4, 1, 4, 4), dtype=np.uint8),
        y_val=np.arange(4) % 2,
        x_test=rng.integers(0, 255, (6, 1, 4, 4), dtype=np.uint8),
        y_test=np.arange(6) % 2,
        class_names=["a", "b"],
    )
    save_canonical(ds, tmp_path / "d.npz")
    data = load_device_data(tmp_path / "d.npz", {"train_size": 10, "val_size": 4}, CPU)
    assert data.x_test is not None and data.y_test is not None
    assert torch.equal(data.x_test, torch.from_numpy(ds.x_test)) and data.y_test.tolist() == [0, 1, 0, 1, 0, 1]


# --- the API: torchvision networks, refused norms, input options, fine-tuning jobs -----------------------


def test_api_validates_torchvision_jobs_and_fine_tuning(client: Any, tmp_path: Path) -> None:
    from tests.factories import image_npz, job_spec
    from tests.factories import upload as upload_dataset

    small = upload_dataset(client, "d8.npz", image_npz(n_per_class=8, size=8)).json()["id"]
    big = upload_dataset(client, "d32.npz", image_npz(n_per_class=8, size=32)).json()["id"]

    def submit(dataset: str, **overrides: Any) -> Any:
        spec = job_spec(dataset, batch_sizes=[2], budget={"epochs": 1}, **overrides)
        return client.post("/v1/jobs", json=spec)

    def refused(resp: Any, *needles: str) -> None:
        assert resp.status_code == 422, resp.text
        for needle in needles:
            assert needle in resp.json()["detail"], resp.json()["detail"]

    assert submit(big, model={"arch": "resnet18"}).status_code == 202
    refused(submit(big, model={"arch": "resnet18"}, variants=[{"norm": "frn"}]), "does not make sense in resnet18")
    refused(
        submit(big, model={"arch": "mobilenet_v3_small"}, variants=[{"norm": "gn", "groups": 16}]),
        "groups=16 does not divide a layer with 72 channels",
    )
    refused(submit(small, model={"arch": "convnext_tiny"}, variants=[{"norm": "ln_channel"}]), "at least 32×32")
    ok = submit(small, model={"arch": "convnext_tiny"}, variants=[{"norm": "ln_channel"}], input={"resize": 32})
    assert ok.status_code == 202, ok.text
    refused(submit(small, input={"crop": 16}), "input.crop 16 is larger than the images as fed (8×8)")
    refused(submit(big, model={"arch": "resnet18"}, variants=[{"norm": "bn_frozen"}]), "set init.weights_id")

    bn_path, _ = upload(tmp_path)
    gn_path, _ = upload(tmp_path, norm="gn")
    ids = {}
    for name, path in (("bn", bn_path), ("gn", gn_path)):
        resp = client.post(
            "/v1/weights", files={"file": ("w.safetensors", path.read_bytes())}, data={"arch": "resnet18"}
        )
        assert resp.status_code == 201, resp.text
        ids[name] = resp.json()["id"]
    variants = [{"norm": n} for n in ("bn", "bn_frozen", "bn_eval", "gn")]
    init = {"weights_id": ids["bn"], "backbone_lr_mult": 0.1}
    resp = submit(big, model={"arch": "resnet18"}, variants=variants, init=init)
    assert resp.status_code == 202, resp.text
    init = {"weights_id": ids["gn"]}
    refused(submit(big, model={"arch": "resnet18"}, variants=variants, init=init), "have none")


@pytest.mark.e2e
@pytest.mark.slow  # a probe and a ResNet-18 job on the CPU: a minute or two on shared cores
def test_a_fine_tuning_job_through_the_worker(client: Any, worker: Any, tmp_path: Path) -> None:
    """Weights and a dataset with a test split uploaded, a probe measured, then a resnet18 fine-tuning job with
    `batch_sizes: "auto"` trained by a real worker: the batch sizes are the probe's, the runs record what their
    init transferred, and the results carry test-split metrics per run and cell."""
    from tests.factories import npz_bytes, pattern_images, wait_for_job
    from tests.factories import upload as upload_dataset

    x, y = pattern_images(n_per_class=4, classes=2, size=32)
    xt, yt = pattern_images(n_per_class=3, classes=2, size=32, seed=5)
    dataset = upload_dataset(client, "ft.npz", npz_bytes(x=x, y=y, x_test=xt, y_test=yt)).json()["id"]
    path, uploaded = upload(tmp_path)
    resp = client.post("/v1/weights", files={"file": ("w.safetensors", path.read_bytes())}, data={"arch": "resnet18"})
    assert resp.status_code == 201, resp.text
    spec = {
        "dataset_id": dataset,
        "model": {"arch": "resnet18"},
        "variants": [{"norm": "bn_frozen"}, {"norm": "gn"}],
        "batch_sizes": "auto",  # from the probe below
        "budget": {"epochs": 1},
        "init": {"weights_id": resp.json()["id"], "backbone_lr_mult": 0.5},
        "input": {"resize": 36, "crop": 32, "random_crop": True},
        "validation_fraction": 0.25,
    }
    from tests.test_probes import wait_for_probe

    keys = ("dataset_id", "model", "variants", "input", "validation_fraction")
    probe = client.post("/v1/probes", json={**{k: spec[k] for k in keys}, "max_batch_size": 4, "steps": 1})
    assert probe.status_code == 202, probe.text
    probe = wait_for_probe(client, probe.json()["id"])
    assert probe["status"] == "succeeded" and probe["result"]["auto_batch_sizes"] == [2, 4], probe
    resp = client.post("/v1/jobs", json=spec)
    assert resp.status_code == 202, resp.text
    assert resp.json()["spec"]["batch_sizes"] == [2, 4] and resp.json()["spec"]["probe_id"] == probe["id"]
    job_id = resp.json()["id"]
    job = wait_for_job(client, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    results = client.get(f"/v1/jobs/{job_id}/results").json()
    for run in results["runs"]:
        assert run["test_acc"] is not None and run["test_loss"] is not None, run
        env = client.get(f"/v1/runs/{run['run_id']}").json()["environment"]
        assert env["init"]["backbone_lr_mult"] == 0.5 and env["init"]["head"].startswith("re-initialised for 2")
        gray = "first conv summed over RGB for 1-channel input"  # the pattern images are grayscale
        bn = ["bn affine", "bn statistics"] if run["variant"] == "bn_frozen" else []
        assert env["init"]["transferred"] == [*bn, "conv weights", gray]
        checked = env["init"]["checked"]  # a backbone parameter equals the upload before training
        assert checked["equals_upload"] is True, checked
        assert checked["sum"] == pytest.approx(float(uploaded[checked["parameter"]].double().sum()), rel=1e-6)
    assert all(cell["test_acc"]["n"] == 1 for cell in results["cells"])
    assert results["batch_sizes"] == [2, 4] and len(results["cells"]) == 4
    report = client.get(f"/v1/jobs/{job_id}/report").text
    assert 'id="transfer"' in report and "pretrained running statistics and affine kept fixed" in report
    assert "BatchNorm statistics cannot transfer" in report and "bn statistics: the variant" in report


def test_the_run_records_that_a_backbone_tensor_equals_the_upload(tmp_path: Path) -> None:
    """The evidence the e2e test reads: a backbone tensor compared with the upload after loading."""
    path, state = upload(tmp_path)
    cfg, data = finetune_config(path, "gn")
    model, record = build_run_model_and_init(cfg, data, CPU)
    assert record is not None
    checked = record["checked"]
    assert checked["equals_upload"] is True and checked["parameter"] == "layer1.0.conv1.weight"
    assert torch.equal(model.state_dict()[checked["parameter"]], state[checked["parameter"]])
