"""Segmentation (issue 13 §1): image + mask uploads (zip of images/ and masks/, or .npz with (N, H, W) masks),
hostile masks refused with nothing stored, the U-Net with the zoo's norms, per-pixel loss and IoU in the engine,
and one job end to end through a real worker (upload → job → results → report with predicted masks)."""

from __future__ import annotations

import base64
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from PIL import Image
from playwright.sync_api import Browser

from app.cli import results_table
from app.config import Settings
from app.core import catalogue, memory
from app.core.budget import resolve_budget
from app.core.dataset_format import IGNORE_LABEL, load_canonical, save_canonical
from app.ingest import IngestError, ingest_file
from app.schemas.jobs import OptimizerSpec
from app.services.seg_report import IGNORED, PALETTE, coloured_mask, relabel_page
from bench.make_shapes_seg import CLASS_NAMES, shapes
from models import build_model
from models.norms import is_norm_layer
from tests import support
from tests.factories import job_spec, npz_bytes, run_job, upload, wait_for_job
from tests.support import WorkerProcess
from tests.test_cli import run, url  # noqa: F401  (`url` is a fixture)
from tests.test_hostile_input import harness  # noqa: F401  (the fixture)
from tests.test_packing import Recorder
from tests.test_ui_browser import browser  # noqa: F401  (the fixture)
from workers.data import DeviceData, channel_stats
from workers.engine import Outcome, PackTrainer, RunConfig
from workers.packing import Member, PackGroup
from workers.run_config import build_run_model, make_optimizer
from workers.schedule import Schedule
from workers.segmentation import confusion, iou_metrics, pixel_loss


def png(arr: np.ndarray, mode: str | None = None, palette: bool = False, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode=mode)
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i * 3 % 256, i * 7 % 256, i * 11 % 256)])
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def seg_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def good_entries(n: int = 4, size: int = 16, palette: bool = False) -> dict[str, bytes]:
    x, y = shapes(n, size, seed=1)
    out: dict[str, bytes] = {}
    for i in range(n):
        out[f"images/{i}.png"] = png(x[i])
        out[f"masks/{i}.png"] = png(y[i], palette=palette)
    return out


def ingest_bytes(tmp_path: Path, name: str, data: bytes, **kw: Any) -> Any:
    path = tmp_path / name
    path.write_bytes(data)
    return ingest_file(path, name, **kw)


# --- ingest ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("palette", [False, True])
def test_a_zip_of_images_and_masks_is_segmentation(tmp_path: Path, palette: bool) -> None:
    entries = good_entries(palette=palette)
    entries["classes.txt"] = "\n".join(CLASS_NAMES).encode()
    ds = ingest_bytes(tmp_path, "s.zip", seg_zip(entries))
    x, y = shapes(4, 16, seed=1)
    assert ds.kind == "segmentation" and ds.class_names == CLASS_NAMES and ds.shape == (3, 16, 16)
    np.testing.assert_array_equal(ds.y, y)  # palette indices, not colours
    np.testing.assert_array_equal(ds.x, x.transpose(0, 3, 1, 2))
    save_canonical(ds, tmp_path / "c.npz")
    back = load_canonical(tmp_path / "c.npz")
    assert back.kind == "segmentation" and back.y.dtype == np.uint8 and back.y.shape == (4, 16, 16)


def test_an_npz_with_mask_labels_is_segmentation_and_ignore_is_remapped(tmp_path: Path) -> None:
    x, y = shapes(6, 16, seed=2)
    y = y.astype(np.int64)
    y[:, 0, :] = 99  # a border of ignored pixels
    ds = ingest_bytes(tmp_path, "s.npz", npz_bytes(x=x, y=y), ignore_index=99)
    assert ds.kind == "segmentation" and ds.num_classes == 4 and ds.class_names == ["0", "1", "2", "3"]
    assert (ds.y[:, 0, :] == IGNORE_LABEL).all() and int(ds.y[:, 1:, :].max()) <= 3
    with pytest.raises(IngestError, match=r"y\[0\] has class 99 at row 0, column 0.*pass ignore_index"):
        ingest_bytes(tmp_path, "s.npz", npz_bytes(x=x, y=y, class_names=np.asarray(CLASS_NAMES)))


def _hostile_zips() -> list[tuple[dict[str, bytes], dict[str, str], str]]:
    g = good_entries()
    big = np.zeros((16, 20), dtype=np.uint8)
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    out = [
        ({**g, "masks/1.png": png(big)}, {}, "mask 'masks/1.png' is 20×16 but its image 'images/1.png' is 16×16"),
        ({k: v for k, v in g.items() if k != "masks/2.png"}, {}, "image 'images/2.png' has no mask in masks/"),
        ({**g, "masks/9.png": g["masks/0.png"]}, {}, "mask 'masks/9.png' has no image in images/"),
        (
            {**g, "masks/1.png": png(np.full((16, 16), 7, np.uint8)), "classes.txt": "\n".join(CLASS_NAMES).encode()},
            {},
            "mask 'masks/1.png' has class 7 at row 0, column 0, outside 0..3",
        ),
        ({**g, "masks/1.png": png(rgb)}, {}, "has RGB pixels; masks must be single-channel"),
        ({**g, "masks/1.jpg": png(rgb, fmt="JPEG")}, {}, "is not a PNG; masks must be lossless"),
        ({**g, "extra/readme.md": b"hi"}, {}, "is not where it belongs"),
        ({**g, "classes.txt": b"a\nb\n"}, {}, "outside 0..1 (class_names has 2)"),
        ({"images/0.png": g["images/0.png"], "masks/0.png": g["masks/0.png"]}, {}, "at least 2"),
    ]
    zero = {k: (png(np.zeros((16, 16), np.uint8)) if k.startswith("masks") else v) for k, v in g.items()}
    out.append((zero, {}, "segmentation needs at least 2 classes"))
    out.append((g, {"kind": "signal"}, "kind=signal needs a .npz"))
    return out


def _hostile_npzs() -> list[tuple[dict[str, Any], dict[str, str], str]]:
    x, y = shapes(4, 16, seed=3)
    bad = [
        ({"y": np.zeros((4, 8, 8), np.int64)}, {}, "masks must be (N, H, W) = (4, 16, 16)"),
        ({"y": np.full((4, 16, 16), 1.5)}, {}, "masks must hold integer class indices"),
        ({"y": np.full((4, 16, 16), -1)}, {}, "has class -1 at row 0, column 0"),
        ({"y": np.arange(4 * 256).reshape(4, 16, 16)}, {}, "outside 0..254"),
        ({"y": np.zeros(4, np.int64)}, {"ignore_index": "255"}, "ignore_index applies to segmentation masks"),
        (
            {"x_val": np.zeros((2, 16, 16, 3), np.uint8), "y_val": np.zeros((2, 16, 17), np.int64)},
            {},
            "y_val has shape (2, 16, 17)",
        ),
    ]
    return [({"x": x, "y": y, **arrays}, form, needle) for arrays, form, needle in bad]


HOSTILE_MASKS = [("s.zip", seg_zip(entries), form, needle) for entries, form, needle in _hostile_zips()] + [
    ("s.npz", npz_bytes(**arrays), form, needle) for arrays, form, needle in _hostile_npzs()
]


@pytest.mark.parametrize(("name", "body", "form", "needle"), HOSTILE_MASKS, ids=[c[3] for c in HOSTILE_MASKS])
def test_hostile_masks_store_nothing(
    harness: Any,  # noqa: F811
    name: str,
    body: bytes,
    form: dict[str, str],
    needle: str,
) -> None:
    with harness() as h:
        h.refuse_upload(name, body, 422, needle, **form)


def test_mask_pixel_bombs_are_refused(harness: Any) -> None:  # noqa: F811
    g = good_entries()
    huge = png(np.zeros((3000, 3000), np.uint8))  # one flat colour: tiny file, millions of pixels
    with harness() as h:
        h.refuse_upload("s.zip", seg_zip({**g, "masks/1.png": huge}), 422, "masks/1.png")
    with harness(max_image_pixels=100) as h:
        h.refuse_upload("s.zip", seg_zip(g), 422, "pixels")


# --- model and engine ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "params"), [("bn", {}), ("gn", {"groups": 4}), ("switchable", {}), ("gn_ws", {"groups": 4})]
)
@pytest.mark.parametrize("levels", [1, 3])
def test_the_unet_has_the_catalogues_norm_sites_and_the_estimated_parameters(
    norm: str, params: dict[str, Any], levels: int
) -> None:
    model = build_model("unet", (3, 13, 10), 5, norm, params, width=8, levels=levels)
    names = [n for n, m in model.named_modules() if is_norm_layer(m)]
    assert names == [s.layer for s in catalogue.norm_sites("unet", width=8, levels=levels)]
    assert model(torch.randn(2, 3, 13, 10)).shape == (2, 5, 13, 10)  # odd sizes come back at their own size
    net = memory.network("unet", (3, 13, 10), 5, width=8, levels=levels)
    assert net.parameters(norm) == sum(p.numel() for p in model.parameters())


def test_pixel_loss_is_cross_entropy_with_ignored_pixels() -> None:
    logits = torch.randn(3, 4, 5, 6)
    y = torch.randint(0, 4, (3, 5, 6), dtype=torch.uint8)
    y[0, 0] = IGNORE_LABEL
    want = F.cross_entropy(logits, y.long(), ignore_index=IGNORE_LABEL)
    assert float(pixel_loss(logits, y)) == pytest.approx(float(want), rel=1e-6)
    assert float(pixel_loss(logits, torch.full_like(y, IGNORE_LABEL))) == 0.0


def test_iou_from_a_confusion_matrix() -> None:
    pred = torch.tensor([[[0, 0, 1, 1], [2, 2, 2, 0]]])  # one model, one 2×4 image
    truth = torch.tensor([[[0, 1, 1, 1], [2, 2, IGNORE_LABEL, 3]]], dtype=torch.uint8)
    cm = confusion(pred.unsqueeze(0), truth, 4)
    # class 0: tp 1, union 3 (pred 0 at (0,0),(0,1),(1,3); truth 0 at (0,0)); 1: 2/3; 2: 2/2; 3: 0/1
    m = iou_metrics(cm[0])
    assert m["val_iou/0"] == pytest.approx(1 / 3) and m["val_iou/1"] == pytest.approx(2 / 3)
    assert m["val_iou/2"] == 1.0 and m["val_iou/3"] == 0.0
    assert m["val_miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 0) / 4)
    assert iou_metrics(cm[0], "test") == {"test_miou": m["val_miou"]}


def seg_data(n_train: int = 24, n_val: int = 8, size: int = 12) -> tuple[DeviceData, dict[str, int]]:
    x, y = shapes(n_train + n_val, size, seed=4)
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    y[:, 0, 0] = IGNORE_LABEL
    mean, std = channel_stats(x[:n_train], image=True)
    t = torch.from_numpy
    data = DeviceData(
        "segmentation",
        t(x[:n_train]),
        t(y[:n_train]),
        t(x[n_train:]),
        t(y[n_train:]),
        t(mean),
        t(std),
        (3, size, size),
        4,
    )
    return data, resolve_budget(n_train, n_val, 1, [4])


@pytest.mark.parametrize("vmapped", [False, True])
@pytest.mark.parametrize("norm", ["bn", "switchable"])
def test_a_pack_of_one_segmentation_step_is_a_plain_eager_step(vmapped: bool, norm: str) -> None:
    """The engine's step (pack of one; `vmapped`: through vmap, as packs of several run) against a module
    forward, F.cross_entropy with ignore_index, backward and torch.optim.SGD."""
    data, budget = seg_data()
    cfg = RunConfig("unet", norm, {}, 4, 0, budget, {"width": 4, "levels": 2}, OptimizerSpec().model_dump(), {}, 5)
    g = PackGroup([Member(0, cfg, Schedule.of(cfg), None, None)], data, torch.device("cpu"))  # type: ignore[arg-type]
    g.vmap_one = vmapped
    with torch.no_grad():
        x, y = g.batch_inputs()
    model = build_run_model(cfg, data, torch.device("cpu"))  # the same seed: the same initial weights
    opt = make_optimizer(model, cfg.optimizer, float(g.lr()[0]))
    loss = F.cross_entropy(model(x[0]), y[0].long(), ignore_index=IGNORE_LABEL)
    loss.backward()
    opt.step()
    g.train_step(False, False)
    assert float(g.ring[0, 0]) == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(g.params[name][0], p, rtol=1e-4, atol=1e-6, msg=name)
    for name, b in model.named_buffers():
        if b.dtype.is_floating_point:
            torch.testing.assert_close(g.buffers[name][0], b, rtol=1e-4, atol=1e-6, msg=name)


def test_masks_take_their_images_flips_and_crops() -> None:
    """Augmented segmentation batches: image channel 0 holds 10 × the class, so after the step's flips and padded
    crops it must still be 10 × the mask wherever the mask is not padding (padding: image 0, mask ignored)."""
    data, budget = seg_data()
    data.x_train[:, 0] = data.y_train.clamp(max=20) * 10  # the ignored corner (255) becomes 200
    data.mean, data.std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    aug = {"hflip": True, "crop_padding": 3}
    cfg = RunConfig("unet", "bn", {}, 4, 0, budget, {"width": 4, "levels": 1}, OptimizerSpec().model_dump(), aug, 5)
    g = PackGroup([Member(0, cfg, Schedule.of(cfg), None, None)], data, torch.device("cpu"))  # type: ignore[arg-type]
    flipped = padded = 0
    for _ in range(g.sched.per_epoch):
        x, y = g.batch_inputs()
        image, mask = x[0, :, 0].round().long(), y[0].long()
        pad = mask == IGNORE_LABEL
        real = ~pad | (image == 200)  # the corner pixel ignored in the upload keeps its image value
        assert torch.equal(image[~pad], mask[~pad] * 10)
        assert (image[pad & ~real] == 0).all()
        padded += int((pad & ~real).sum())
        flipped += int(g.flip.gather(1, (g.step % g.sched.per_epoch).unsqueeze(1) * 4 + g.arange_b).sum())
        g.step += 1
    assert padded > 0 and flipped > 0


def test_the_engine_reports_iou_metrics_and_a_preview_per_run() -> None:
    data, budget = seg_data()
    opt = OptimizerSpec().model_dump()
    cfgs = [RunConfig("unet", n, {}, 4, 0, budget, {"width": 4, "levels": 2}, opt, {}, 5) for n in ("bn", "in")]
    trainer = PackTrainer(cfgs, data, torch.device("cpu"), [Recorder(), Recorder()])
    results = trainer.run()
    for i, out in enumerate(results):
        assert isinstance(out, Outcome) and out.status == "succeeded"
        f = out.final_metrics
        assert {"val_miou", "val_acc", "val_loss", "val_acc_train_mode"} <= f.keys()
        assert 0 <= f["val_miou"] <= 1 and any(k.startswith("val_iou/") for k in f)
        preview = trainer.execution(i)["seg_preview"]
        pred = np.asarray(Image.open(io.BytesIO(base64.b64decode(preview["pred"]))))
        truth = np.asarray(Image.open(io.BytesIO(base64.b64decode(preview["truth"]))))
        assert pred.shape == truth.shape == (12, 12) and int(pred.max()) < 4
        np.testing.assert_array_equal(truth, data.y_val[0].numpy())


# --- end to end -------------------------------------------------------------------------------------------------


def test_segmentation_submit_checks(client: TestClient) -> None:
    ds = upload(client, "s.zip", seg_zip(good_entries(n=6)))
    assert ds.status_code == 201, ds.text
    assert ds.json()["kind"] == "segmentation" and ds.json()["shape"] == [3, 16, 16]
    spec = job_spec(ds.json()["id"], model={"arch": "auto", "width": 4, "levels": 2}, batch_sizes=[2])
    for bad, needle in (
        ({"input": {"resize": 8}}, "input resize/crop and init apply to classification images"),
        ({"model": {"arch": "cnn"}}, "needs image data; dataset"),
    ):
        resp = client.post("/v1/jobs", json={**spec, **bad})
        assert resp.status_code == 422 and needle in resp.json()["detail"], resp.text


@pytest.mark.e2e
def test_a_segmentation_job_runs_end_to_end(client: TestClient, worker: WorkerProcess) -> None:
    x, y = shapes(48, 16, seed=5)
    data = npz_bytes(x=x[:40], y=y[:40], x_test=x[40:], y_test=y[40:], class_names=np.asarray(CLASS_NAMES))
    ds = upload(client, "shapes.npz", data)
    assert ds.status_code == 201, ds.text
    spec = job_spec(
        ds.json()["id"],
        model={"arch": "unet", "width": 4, "levels": 2},
        variants=[{"norm": "bn"}, {"norm": "gn", "groups": 2}],
        batch_sizes=[2, 4],
        budget={"epochs": 1},
    )
    job, results = run_job(client, spec)
    job_id = job["id"]
    assert job["status"] == "succeeded", results["runs"]
    assert results["metric"] == "val_miou" and len(results["runs"]) == 4
    run = results["runs"][0]
    metrics = client.get(f"/v1/runs/{run['run_id']}/metrics").json()["metrics"]
    assert {"val_miou", "val_acc", "val_loss", "val_iou/0"} <= set(metrics)
    assert run["val_acc"] == pytest.approx(metrics["val_miou"][-1]["value"])  # the primary metric: mean IoU
    assert run["test_acc"] == pytest.approx(metrics["test_miou"][-1]["value"])  # and on the test split
    text = " ".join(results["verdicts"] + results["how_to_read"])
    assert "mean IoU points" in text and "accuracy" not in text
    report = client.get(f"/v1/jobs/{job_id}/report")
    assert report.status_code == 200
    html = report.text
    assert 'id="segmentation"' in html and "validation mean IoU" in html
    assert "<th>val mIoU % (mean)</th>" in html and "<th>baseline mIoU %</th>" in html and " acc %<" not in html
    assert "accuracy" not in " ".join(re.findall(r">([^<]+)<", html)), "a text node still says accuracy"
    masks = re.findall(r'<img class="mask" src="data:image/png;base64,([^"]+)" alt="([^"]+)"', html)
    alts = {alt for _, alt in masks}
    assert {"true mask", "validation image", "bn at batch 2", "gn(2) at batch 4"} <= alts
    truth = next(b64 for b64, alt in masks if alt == "true mask")
    assert Image.open(io.BytesIO(base64.b64decode(truth))).size == (16, 16)
    for name in CLASS_NAMES:
        assert name in html


def test_the_cli_uploads_a_mask_zip_and_labels_results_by_mean_iou(
    url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    path = tmp_path / "shapes.zip"
    path.write_bytes(seg_zip({**good_entries(n=6), "classes.txt": "\n".join(CLASS_NAMES).encode()}))
    code, _, err = run(capsys, "--url", url, "datasets", "upload", str(path))
    assert code == 0, err
    assert "segmentation 3×16×16, 4 classes, 6 samples" in err
    code, _, err = run(capsys, "--url", url, "datasets", "upload", str(path), "--kind", "segmentation")
    assert code == 0, err
    table = results_table({"metric": "val_miou", "cells": [], "variants": [], "batch_sizes": []})
    assert table.startswith("final validation mean IoU (%)")


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    with support.live_server(settings) as base:
        yield base


@pytest.mark.e2e
@pytest.mark.system
def test_the_segmentation_report_shows_its_masks_in_headless_chromium(
    client: TestClient,
    worker: WorkerProcess,
    live_server: str,
    browser: Browser,  # noqa: F811
) -> None:
    x, y = shapes(24, 16, seed=6)
    ds = upload(client, "shapes.npz", npz_bytes(x=x, y=y, class_names=np.asarray(CLASS_NAMES)))
    assert ds.status_code == 201, ds.text
    spec = job_spec(
        ds.json()["id"],
        model={"arch": "unet", "width": 4, "levels": 1},
        variants=[{"norm": "bn"}, {"norm": "switchable"}],
        batch_sizes=[2],
        budget={"epochs": 1},
    )
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    assert wait_for_job(client, job_id)["status"] == "succeeded"
    page = browser.new_page()
    try:
        page.goto(f"{live_server}/v1/jobs/{job_id}/report")
        masks = page.eval_on_selector_all(
            "#segmentation img.mask", "els => els.map(e => [e.alt, e.complete, e.naturalWidth, e.naturalHeight])"
        )
        heading = page.inner_text("#segmentation h2")
    finally:
        page.close()
    # decoded by the browser (the report's CSP allows data: images): image, truth, one prediction per variant
    assert {m[0] for m in masks} == {"validation image", "true mask", "bn at batch 2", "switchable at batch 2"}
    assert all(m[1] and m[2] == 16 and m[3] == 16 for m in masks), masks
    assert "Predicted masks" in heading


def test_report_masks_are_coloured_and_bad_previews_show_nothing() -> None:
    mask = np.array([[0, 1], [3, IGNORE_LABEL]], dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    uri = coloured_mask(base64.b64encode(buf.getvalue()).decode())
    assert uri is not None and uri.startswith("data:image/png;base64,")
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    assert [tuple(rgb[0, 0]), tuple(rgb[0, 1]), tuple(rgb[1, 0]), tuple(rgb[1, 1])] == [
        PALETTE[0],
        PALETTE[1],
        PALETTE[3],
        IGNORED,
    ]
    for bad in (None, 7, "not base64!", base64.b64encode(b"GIF89a").decode(), "A" * 300_000):
        assert coloured_mask(bad) is None
    page = '<section id="accuracy"><h2>Final validation accuracy (%)</h2><a href="?metric=val_acc">accuracy</a>'
    assert relabel_page(page, "val_miou") == (
        '<section id="accuracy"><h2>Final validation mean IoU (%)</h2><a href="?metric=val_acc">mean IoU</a>'
    )
    assert relabel_page(page, "val_acc") == page
