"""1-D signals (issue 13 §2): `.npz` uploads stated as `kind=signal`, stored as float32 N×C×L, the 1-D networks
with the zoo's norms, submit-time checks, the worker's data path, hostile uploads, and one job end to end through
a real worker (upload → job → results → report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.core import catalogue, memory
from app.core.catalogue import CatalogueError
from app.core.dataset_format import CanonicalDataset, load_canonical, save_canonical
from app.ingest import IngestError, IngestLimits, ingest_file
from models import build_model
from models.norms import is_norm_layer
from tests.factories import job_spec, npz_bytes, run_job, upload
from tests.support import WorkerProcess
from tests.test_cli import run, url  # noqa: F401  (`url` is a fixture)
from tests.test_hostile_input import harness  # noqa: F401  (the fixture)
from workers.data import channel_stats, load_device_data

LENGTH = 128


def waves(n_per_class: int = 40, channels: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sine (class 0) against square (class 1) waves of random frequency and phase, with noise: (N, L), or
    (N, C, L) with the second channel a noisy copy at a shifted phase when `channels` is given."""
    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH) / LENGTH
    xs, ys = [], []
    for label in (0, 1):
        for _ in range(n_per_class):
            freq, phase = rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
            rows = []
            for c in range(channels or 1):
                s = np.sin(2 * np.pi * freq * t + phase + c)
                s = s if label == 0 else np.sign(s)
                rows.append(s + rng.normal(0, 0.3, LENGTH))
            xs.append(np.stack(rows) if channels else rows[0])
            ys.append(label)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys)


def write(tmp_path: Path, name: str, **arrays: Any) -> Path:
    path = tmp_path / name
    path.write_bytes(npz_bytes(**arrays))
    return path


# --- ingest ----------------------------------------------------------------------------------------------------


def test_a_signal_upload_is_stored_as_float32_ncl(tmp_path: Path) -> None:
    x, y = waves()
    ds = ingest_file(write(tmp_path, "w.npz", x=x, y=y), "w.npz", kind="signal")
    assert ds.kind == "signal" and ds.shape == (1, LENGTH) and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x[:, 0], x.astype(np.float32))
    x2, y2 = waves(channels=3)
    ds2 = ingest_file(write(tmp_path, "w2.npz", x=x2, y=y2, x_val=x2[:5], y_val=y2[:5]), "w2.npz", kind="signal")
    assert ds2.shape == (3, LENGTH) and ds2.x_val is not None and ds2.x_val.shape == (5, 3, LENGTH)
    save_canonical(ds2, tmp_path / "c.npz")
    back = load_canonical(tmp_path / "c.npz")
    assert back.kind == "signal" and np.array_equal(back.x, ds2.x)
    # Without the stated kind an (N, C, L) array is what it always was: grayscale images.
    assert ingest_file(write(tmp_path, "w3.npz", x=(x2 > 0).astype(np.uint8), y=y2), "w3.npz").kind == "image"
    ints = ingest_file(
        write(tmp_path, "w4.npz", x=np.arange(40, dtype=np.int16).reshape(4, 10), y=[0, 1, 0, 1]), "w4.npz"
    )
    assert ints.kind == "tabular"


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((4, 2, 3, 5))}, "needs x of shape (N, L) for one channel or (N, C, L)"),
        ({"x": np.zeros((4,))}, "needs x of shape (N, L)"),
        ({"x": np.where(np.eye(4, 8) > 0, np.nan, 0.0)}, "x contains NaN or infinite values (first at sample 0"),
        ({"x": np.full((4, 2, 8), np.inf)}, "NaN or infinite"),
        ({"x": np.full((4, 8), 1e300)}, "a value too large for float32"),
        ({"x": np.array([["a"] * 8] * 4)}, "signal values must be numbers"),
        ({"x": np.zeros((4, 8)), "x_val": np.zeros((2, 9)), "y_val": np.zeros(2, int)}, "same per-sample shape"),
        ({"x": np.zeros((4, 2000, 4))}, "2000 channels, more than the limit of 1024"),
    ],
)
def test_bad_signal_arrays_are_named(tmp_path: Path, arrays: dict[str, Any], needle: str) -> None:
    arrays = {"y": np.array([0, 1, 0, 1]), **arrays}
    with pytest.raises(IngestError) as info:
        ingest_file(write(tmp_path, "s.npz", **arrays), "s.npz", kind="signal")
    assert needle in str(info.value)


def test_signal_length_limit(tmp_path: Path) -> None:
    limits = IngestLimits(max_signal_length=64)
    ok = ingest_file(
        write(tmp_path, "a.npz", x=np.zeros((4, 64)), y=[0, 1, 0, 1]), "a.npz", limits=limits, kind="signal"
    )
    assert ok.shape == (1, 64)
    with pytest.raises(IngestError, match="length 65, more than the limit of 64"):
        ingest_file(
            write(tmp_path, "b.npz", x=np.zeros((4, 65)), y=[0, 1, 0, 1]), "b.npz", limits=limits, kind="signal"
        )
    assert IngestLimits().max_signal_length == 1 << 20  # the documented limit (README, the upload form)


def test_signal_needs_an_npz_and_a_stated_kind_must_fit(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n")
    with pytest.raises(IngestError, match="kind=signal needs a .npz upload"):
        ingest_file(csv, "t.csv", kind="signal")
    with pytest.raises(IngestError, match="which is tabular data, not image"):
        ingest_file(write(tmp_path, "t.npz", x=np.zeros((4, 5)), y=[0, 1, 0, 1]), "t.npz", kind="image")


# --- networks, catalogue, memory -----------------------------------------------------------------------------------

NETS_1D = [("cnn1d", {"width": 8}), ("resnet1d", {"depth": 8, "width": 8}), ("resnet1d", {"depth": 14, "width": 4})]


@pytest.mark.parametrize(("arch", "kw"), NETS_1D)
# Norms that need pretrained statistics (`needs_init`) are the fine-tuning ones: not for signal networks.
@pytest.mark.parametrize("norm", sorted(n for n, i in catalogue.NORMS.items() if not getattr(i, "needs_init", False)))
def test_1d_networks_train_with_every_norm(arch: str, kw: dict[str, Any], norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, (2, 33), 3, norm, {}, **kw).train()
    sites = catalogue.norm_sites(arch, **kw)
    norms = [m for m in model.modules() if is_norm_layer(m)]
    assert [getattr(m, "num_features", getattr(m, "num_channels", None)) for m in norms] == [s.channels for s in sites]
    x = torch.randn(4, 2, 33)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    if norm not in memory.NORM_PARAMS_PER_CHANNEL:  # a norm the memory estimate does not describe yet
        return
    net = memory.network(arch, (2, 33), 3, **kw)
    assert net.parameters(norm) == sum(p.numel() for p in model.parameters()), norm
    assert net.buffer_bytes(norm) == sum(b.numel() * b.element_size() for b in model.buffers()), norm


def test_bn_in_a_1d_network_is_batchnorm1d() -> None:
    torch.manual_seed(0)
    model = build_model("cnn1d", (1, 16), 2, "bn", {}, width=4).train()
    ref = torch.nn.BatchNorm1d(4).train()
    x = torch.randn(5, 4, 16)
    torch.testing.assert_close(model.features[1](x), ref(x))


def test_input_kinds_are_checked() -> None:
    with pytest.raises(CatalogueError, match="'cnn1d' needs signal inputs; got image shape"):
        build_model("cnn1d", (1, 8, 8), 2, "bn", {})
    with pytest.raises(CatalogueError, match="'cnn' needs image inputs; got signal shape"):
        build_model("cnn", (1, 64), 2, "bn", {})
    assert build_model("mlp", (2, 16), 2, "bn", {}, hidden=[8])(torch.randn(3, 2, 16)).shape == (3, 2)
    assert catalogue.AUTO_ARCH["signal"] == "cnn1d"


def test_the_worker_normalizes_signals_per_channel(tmp_path: Path) -> None:
    x, y = waves(channels=2)
    x[:, 1] = x[:, 1] * 5 + 3
    ds = CanonicalDataset("signal", x.astype(np.float32), y.astype(np.int64), ["sine", "square"])
    save_canonical(ds, tmp_path / "s.npz")
    budget = {"val_size": 10, "train_size": 70}
    data = load_device_data(tmp_path / "s.npz", budget, torch.device("cpu"))
    assert data.kind == "signal" and data.input_shape == (2, LENGTH) and data.mean.shape == (1, 2, 1)
    batch = data.prepare(data.x_train)
    torch.testing.assert_close(batch.mean(dim=(0, 2)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.std(dim=(0, 2)), torch.ones(2), atol=1e-3, rtol=0)
    mean, std = channel_stats(data.x_train.numpy(), image=True)
    assert mean.shape == (1, 2, 1) and std.shape == (1, 2, 1)


# --- API: uploads and submit-time checks ---------------------------------------------------------------------------


def test_signal_upload_and_submit_checks(client: TestClient) -> None:
    x, y = waves(channels=2)
    resp = upload(client, "waves.npz", npz_bytes(x=x, y=y), kind="signal")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["kind"] == "signal" and ds["shape"] == [2, LENGTH] and ds["num_samples"] == 80
    spec = job_spec(ds["id"], model={"arch": "cnn", "width": 8})
    refused = client.post("/v1/jobs", json=spec)
    assert refused.status_code == 422 and "needs image data" in refused.json()["detail"]
    assert "'cnn1d'" in refused.json()["detail"] and "'resnet1d'" in refused.json()["detail"]
    refused = client.post("/v1/jobs", json=job_spec(ds["id"], model={"arch": "cnn1d"}, augment={"hflip": True}))
    assert refused.status_code == 422 and "augment applies to images only; dataset is signal" in refused.text
    auto = client.post("/v1/jobs", json=job_spec(ds["id"], model={"arch": "auto", "width": 8}))
    assert auto.status_code == 202, auto.text
    assert auto.json()["spec"]["model"]["arch"] == "cnn1d"
    image = upload(client, "img.npz", npz_bytes(x=(x > 0).astype(np.uint8), y=y)).json()
    refused = client.post("/v1/jobs", json=job_spec(image["id"], model={"arch": "resnet1d"}))
    assert refused.status_code == 422 and "'resnet1d' needs signal data" in refused.json()["detail"]
    bad_kind = upload(client, "waves.npz", npz_bytes(x=x, y=y), kind="audio")
    assert bad_kind.status_code == 422


@pytest.mark.parametrize(
    ("filename", "arrays", "needle"),
    [
        ("w.npz", {"x": np.zeros((4, 2, 3, 5))}, "needs x of shape (N, L)"),
        ("w.npz", {"x": np.where(np.eye(4, 16) > 0, np.nan, 0.0)}, "NaN or infinite values"),
        ("w.npz", {"x": np.full((4, 16), -np.inf)}, "NaN or infinite values"),
        ("w.npz", {"x": np.zeros((4, (1 << 20) + 1), dtype=np.int8)}, "more than the limit of 1048576"),
        ("w.npz", {"x": np.zeros((4, 16)), "y": np.array([0, 1, 7])}, "same number of samples"),
    ],
)
def test_hostile_signal_uploads_store_nothing(harness: Any, filename: str, arrays: dict[str, Any], needle: str) -> None:  # noqa: F811
    arrays = {"y": np.array([0, 1, 0, 1]), **arrays}
    with harness() as h:
        h.refuse_upload(filename, npz_bytes(**arrays), 422, needle, kind="signal")
        h.refuse_upload("t.csv", b"a,b,label\n1,2,0\n", 422, "kind=signal needs a .npz upload", kind="signal")


# --- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_signal_job_runs_end_to_end(client: TestClient, worker: WorkerProcess) -> None:
    x, y = waves(n_per_class=48)
    ds = upload(client, "waves.npz", npz_bytes(x=x, y=y, class_names=np.array(["sine", "square"])), kind="signal")
    assert ds.status_code == 201, ds.text
    spec = job_spec(
        ds.json()["id"],
        model={"arch": "cnn1d", "width": 8},
        variants=[{"norm": "bn"}, {"norm": "gn", "groups": 4}, {"norm": "switchable"}],
        batch_sizes=[2, 8],
    )
    job, results = run_job(client, spec)
    assert job["status"] == "succeeded", results["runs"]
    assert all(r["status"] == "succeeded" for r in results["runs"]) and len(results["runs"]) == 6
    assert {(c["variant"], c["batch_size"]) for c in results["cells"]} == {
        (v, b) for v in ("bn", "gn(4)", "switchable") for b in (2, 8)
    }
    assert max(r["val_acc"] for r in results["runs"]) > 0.6  # sines from squares: learnable in 2 epochs
    switchable = next(r for r in results["runs"] if r["variant"] == "switchable")
    metrics = client.get(f"/v1/runs/{switchable['run_id']}/metrics").json()["metrics"]
    assert {f"sn_mix/features.1/{p}_{s}" for p in ("mean", "var") for s in ("bn", "in", "ln")} <= set(metrics)
    report = client.get(f"/v1/jobs/{job['id']}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    html = report.text
    for variant in ("bn", "gn(4)", "switchable"):
        assert variant in html
    assert 'id="switchable-mixtures"' in html and "switchable · batch 8" in html


def test_the_cli_uploads_signals_with_kind(url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # noqa: F811
    x, y = waves(channels=2)
    path = write(tmp_path, "waves.npz", x=x, y=y)
    code, _, err = run(capsys, "--url", url, "datasets", "upload", str(path), "--kind", "signal")
    assert code == 0, err
    assert "signal 2×128, 2 classes, 80 samples" in err
    code, _, err = run(capsys, "--url", url, "datasets", "upload", str(path))  # (N, 2, 128) alone reads as images
    assert code == 1 and "kind=signal" in err
