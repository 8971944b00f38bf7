"""Token sequences (issue 13 §2): text uploads (.csv with kind=text, .jsonl) stored as byte tokens, the pre-norm
Transformer with ln / rmsnorm / gn / masked bn / none, padding that never reaches a real token, packing under
vmap, the tokens a run has seen, hostile text files, and one text job end to end through a real worker."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, expect
from torch import nn

from app.config import Settings
from app.core import catalogue, memory
from app.core.catalogue import CatalogueError
from app.core.dataset_format import TEXT_PAD, save_canonical
from app.ingest import IngestError, IngestLimits, ingest_file
from app.schemas.jobs import OptimizerSpec
from models import build_model
from models.norms import create_norm_layer
from models.transformer import MaskedBatchNorm
from tests.factories import job_spec, run_job, upload
from tests.support import WorkerProcess, live_server
from tests.test_cli import run, url  # noqa: F401  (`url` is a fixture)
from tests.test_hostile_input import harness  # noqa: F401  (the fixture)
from tests.test_packing import Recorder
from tests.test_ui_browser import axe_source, browser, tab, title  # noqa: F401  (the fixtures)
from tests.vmapped_pack import assert_pack_equals_each_model
from workers.data import load_device_data
from workers.engine import PackTrainer, RunConfig

CPU = torch.device("cpu")
NORMS = ("ln", "rmsnorm", "gn", "bn", "none")
LETTERS = ("abcdefghijklm", "nopqrstuvwxyz")


def texts(n_per_class: int = 30, seed: int = 0, longest: int = 40) -> list[tuple[str, str]]:
    """Class `early` is words of a–m, class `late` of n–z, of random lengths: learnable from bytes alone."""
    rng = np.random.default_rng(seed)
    out = []
    for label, letters in zip(("early", "late"), LETTERS, strict=True):
        for _ in range(n_per_class):
            n = int(rng.integers(3, longest))
            out.append(("".join(rng.choice(list(letters + "  "), n)).strip() or letters[0], label))
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def csv_bytes(rows: list[tuple[str, str]], header: str = "text,label") -> bytes:
    lines = [header] + [f'"{t.replace(chr(34), chr(34) * 2)}",{label}' for t, label in rows]
    return ("\n".join(lines) + "\n").encode()


def jsonl_bytes(rows: list[tuple[str, Any]], text: str = "text", label: str = "label") -> bytes:
    return "".join(json.dumps({text: t, label: y}) + "\n" for t, y in rows).encode()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- ingest ----------------------------------------------------------------------------------------------------


def test_csv_and_jsonl_become_byte_tokens_with_a_summary(tmp_path: Path) -> None:
    rows = [("héllo, world", "pos"), ("bad", "neg"), ("fine days", "pos"), ("no", "neg")]
    ds = ingest_file(write(tmp_path, "t.csv", csv_bytes(rows)), "t.csv", kind="text", max_length=8)
    assert ds.kind == "text" and ds.x.dtype == np.uint16 and ds.class_names == ["neg", "pos"]
    assert ds.x.shape == (4, 8) and ds.y.tolist() == [1, 0, 1, 0]
    raw = "héllo, world".encode()[:8]
    assert ds.x[0].tolist() == [b + 1 for b in raw]  # byte b is token b + 1, cut at max_length
    assert ds.x[1].tolist() == [ord(c) + 1 for c in "bad"] + [TEXT_PAD] * 5
    assert ds.summary is not None
    assert ds.summary["truncated_texts"] == 2 and ds.summary["max_length"] == 8 and ds.summary["vocab_size"] == 257
    assert ds.summary["longest_text_bytes"] == len("héllo, world".encode())
    js = ingest_file(
        write(tmp_path, "t.jsonl", jsonl_bytes([(t, i % 2) for i, (t, _) in enumerate(rows)], "body", "y")),
        "t.jsonl",
        text_column="body",
        label_column="y",
    )
    assert js.kind == "text" and js.x.shape == (4, len("héllo, world".encode())) and js.summary["truncated_texts"] == 0
    assert js.class_names == ["0", "1"]


@pytest.mark.parametrize(
    ("name", "data", "form", "needle"),
    [
        ("t.csv", b"text,label\nok,a\nfine,b\n\xff\xfe,a\n", {}, "line 4 of 't.csv' is not valid UTF-8"),
        ("t.jsonl", b'{"text": "a", "label": 1}\n[1, 2]\n', {}, "line 2 of 't.jsonl' is a JSON list, not an object"),
        ("t.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"\n', {}, "line 2 of 't.jsonl' is not valid JSON"),
        ("t.jsonl", b'{"text": "a", "label": 1}\n{"text": "b"}\n', {}, "line 2 has no 'label' key"),
        ("t.jsonl", b'{"text": "a", "label": 1}\n{"text": "  ", "label": 0}\n', {}, "line 2 has an empty text"),
        ("t.jsonl", b'{"text": "a", "label": 1.5}\n', {}, "a label must be a string or an integer"),
        ("t.csv", b"body,label\nok,a\n", {}, "column(s) 'text' not found; the header has 'body', 'label'"),
        ("t.csv", b"text,label\nok,\n", {}, "row 2 has an empty label"),
        ("t.csv", b"text,label\nok,a\nok,a\n", {}, "only one class"),
        ("t.csv", b"text,label\nok,a\nfine,b\nyes,a\n", {}, "class 1 ('b') has 1 training sample"),
        ("t.csv", b"text,label\nok,a\n", {"max_length": "4"}, "Input should be greater than or equal to 8"),
        ("t.npz", b"PK\x03\x04", {"kind": "text"}, "kind=text needs a .csv or .jsonl upload"),
    ],
)
def test_hostile_text_uploads_store_nothing(harness: Any, name: str, data: bytes, form: dict, needle: str) -> None:  # noqa: F811
    form = {"kind": "text", **form} if name.endswith(".csv") else form
    with harness() as h:
        h.refuse_upload(name, data, 422, needle, **form)


def test_too_many_classes_are_refused(tmp_path: Path) -> None:
    rows = [(f"t{i}", f"c{i}") for i in range(catalogue.MAX_CLASSES + 1)]
    with pytest.raises(IngestError, match="10001 classes, more than the limit of 10000"):
        ingest_file(write(tmp_path, "t.jsonl", jsonl_bytes(rows)), "t.jsonl")


def test_a_100_mb_single_line_is_refused_while_streaming(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.write(b'{"text": "')
        block = b"a" * (1 << 20)
        for _ in range(100):
            f.write(block)
        f.write(b'", "label": 0}\n')
    tracemalloc.start()
    try:
        with pytest.raises(IngestError, match="line 1 of 'big.jsonl' is longer than 1.0 MiB"):
            ingest_file(path, "big.jsonl", limits=IngestLimits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # one bounded line, never the 100 MB


def test_a_100_mb_single_line_upload_gets_a_4xx_and_stores_nothing(harness: Any) -> None:  # noqa: F811
    data = b"text,label\n" + b"x" * (100 * 2**20) + b",a\n"
    with harness() as h:
        h.refuse_upload("big.csv", data, 422, "line 2 of 'big.csv' is longer than 1.0 MiB", kind="text")


# --- the model --------------------------------------------------------------------------------------------------


def tokens(batch: int, length: int, real: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 257, (batch, length), generator=g, dtype=torch.int32)
    for i, n in enumerate(real):
        x[i, n:] = TEXT_PAD
    return x


def test_rmsnorm_is_torchs_on_tokens_and_scales_without_centering() -> None:
    ours, theirs = create_norm_layer("rmsnorm", 16), nn.RMSNorm(16, eps=1e-6)
    x = torch.randn(12, 16) * 3 + 1
    torch.testing.assert_close(ours(x), theirs(x))
    y = create_norm_layer("rmsnorm", 4)(torch.randn(2, 4, 5, 5) + 5)
    assert y.mean() > 0.5  # no mean is removed
    torch.testing.assert_close(y.square().mean(dim=(1, 2, 3)), torch.ones(2), rtol=1e-4, atol=1e-4)


def test_masked_bn_statistics_ignore_padding() -> None:
    torch.manual_seed(0)
    bn = MaskedBatchNorm(8).train()
    x = torch.randn(3, 10, 8)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :4], mask[1, :10], mask[2, :1] = True, True, True
    real = x[mask]  # (15, 8) real tokens
    out = bn(x, mask)
    torch.testing.assert_close(out[mask].mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.running_mean, 0.1 * real.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * real.var(0, correction=1))
    # Other padded values, and more padding: the same statistics and real outputs.
    wider = torch.cat([x, torch.randn(3, 6, 8) * 100], dim=1)
    wider[~torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], 1)] = 1e4
    other = MaskedBatchNorm(8).train()
    out2 = other(wider, torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], 1))
    torch.testing.assert_close(out2[:, :10][mask], out[mask])
    torch.testing.assert_close(other.running_mean, bn.running_mean)
    torch.testing.assert_close(other.running_var, bn.running_var)


@pytest.mark.parametrize("norm", NORMS)
def test_real_tokens_do_not_see_padding(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model("transformer", (48,), 3, norm, {}, width=16, layers=2, heads=4).train()
    x = tokens(4, 32, [5, 32, 17, 1])
    out = model(x)
    # The same texts padded to 48 with other padded values in the way: PAD ids are PAD ids, so only the
    # amount of padding can change, and it must not change the logits or BatchNorm's running statistics.
    longer = torch.cat([x, torch.full((4, 16), TEXT_PAD, dtype=x.dtype)], dim=1)
    torch.manual_seed(0)
    again = build_model("transformer", (48,), 3, norm, {}, width=16, layers=2, heads=4).train()
    torch.testing.assert_close(again(longer), out, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(model.named_buffers(), again.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    model.eval()
    torch.testing.assert_close(model(longer), model(x), rtol=1e-4, atol=1e-5)


def test_padding_embeddings_never_reach_real_tokens() -> None:
    """Changing what the padded positions hold (their embeddings and positions) changes nothing real."""
    torch.manual_seed(0)
    model = build_model("transformer", (32,), 3, "bn", {}, width=16).train()
    x = tokens(3, 32, [4, 20, 9])
    out = model(x)
    with torch.no_grad():
        model.embed.weight[TEXT_PAD].normal_(std=50.0)
        model.pos[25:].normal_(std=50.0)
    model.blocks[0].norm1.running_mean.zero_()
    model.blocks[0].norm1.running_var.fill_(1.0)
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_a_vmapped_pack_of_two_equals_separate_runs(norm: str) -> None:
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(build_model("transformer", (24,), 2, norm, {}, width=8, heads=2).train())
    base = build_model("transformer", (24,), 2, norm, {}, width=8, heads=2).train().to("meta")
    x = torch.stack([tokens(4, 24, [3, 24, 10, 7], seed=s) for s in (5, 6)])
    assert_pack_equals_each_model(models, base, x, rtol=1e-4, atol=1e-5)


def test_the_catalogue_takes_five_norms_and_checks_heads() -> None:
    assert catalogue.AUTO_ARCH["text"] == "transformer"
    sites = catalogue.norm_sites("transformer", width=16, layers=3)
    assert [s.layer for s in sites][-2:] == ["blocks.2.norm2", "norm"] and len(sites) == 7
    for norm in catalogue.NORMS:
        if norm in NORMS:
            catalogue.check_variant(norm, {}, sites, arch="transformer")
        else:
            with pytest.raises(CatalogueError, match="the transformer takes ln, rmsnorm, gn"):
                catalogue.check_variant(norm, {}, sites, arch="transformer")
    with pytest.raises(CatalogueError, match="width 10 must be a multiple of heads 4"):
        catalogue.norm_sites("transformer", width=10, heads=4)
    for norm in NORMS:  # the memory estimate counts the real model's parameters
        model = build_model("transformer", (40,), 5, norm, {}, width=16, layers=2, heads=4)
        net = memory.network("transformer", (40,), 5, width=16, layers=2, heads=4)
        assert net.parameters(norm) == sum(p.numel() for p in model.parameters()), norm


# --- the engine ----------------------------------------------------------------------------------------------------


def text_dataset(tmp_path: Path, n_per_class: int = 40) -> Path:
    rows = texts(n_per_class)
    ds = ingest_file(write(tmp_path, "t.csv", csv_bytes(rows)), "t.csv", kind="text", max_length=32)
    path = tmp_path / "text.npz"
    save_canonical(ds, path)
    return path


def cfg(norm: str, batch: int, seed: int, budget: dict[str, int]) -> RunConfig:
    return RunConfig(
        arch="transformer",
        norm=norm,
        norm_params={},
        batch_size=batch,
        seed=seed,
        budget=budget,
        model={"width": 16, "layers": 1, "heads": 4},
        optimizer=OptimizerSpec().model_dump(),
        augment={},
        log_every_steps=5,
    )


def test_packed_text_runs_equal_single_runs_and_count_tokens(tmp_path: Path) -> None:
    path = text_dataset(tmp_path)
    budget = {"epochs": 2, "train_size": 64, "val_size": 16, "samples_per_epoch": 64, "total_samples": 128}
    data = load_device_data(path, budget, CPU)
    assert data.x_train.dtype == torch.int32 and data.prepare(data.x_train) is data.x_train  # never normalized
    runs = [cfg("bn", 8, 0, budget), cfg("bn", 8, 1, budget)]
    packed = [Recorder(), Recorder()]
    PackTrainer(runs, data, CPU, packed).run()
    for run_cfg, rec in zip(runs, packed, strict=True):
        alone = Recorder()
        PackTrainer([run_cfg], data, CPU, [alone]).run()
        skip = ("tokens_per_s",)
        a = {k: v for k, v in alone.curve().items() if k[1] not in skip}
        b = {k: v for k, v in rec.curve().items() if k[1] not in skip}
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    # Tokens: every run of one seed sees the same real tokens, whatever its batch size or norm.
    other = Recorder()
    PackTrainer([cfg("ln", 4, 0, budget)], data, CPU, [other]).run()
    seen = {rec: next(p.value for p in rec.points if p.name == "tokens" and p.epoch == 2) for rec in (*packed, other)}
    assert seen[packed[0]] == seen[other] == data.tokens_seen(0, 2, 64)
    lengths = (data.x_train != TEXT_PAD).sum(1)
    assert data.tokens_seen(0, 1, 64) == int(lengths.sum())  # an epoch is every training sample here


# --- API and end to end ---------------------------------------------------------------------------------------------


def test_text_upload_and_submit_checks(client: TestClient) -> None:
    resp = upload(client, "t.jsonl", jsonl_bytes(texts(20)), max_length="16")
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    assert ds["kind"] == "text" and ds["shape"] == [16] and ds["summary"]["max_length"] == 16
    assert ds["summary"]["truncated_texts"] > 0
    refused = client.post("/v1/jobs", json=job_spec(ds["id"], model={"arch": "cnn", "width": 8}))
    assert refused.status_code == 422 and "'transformer'" in refused.json()["detail"]
    refused = client.post("/v1/jobs", json=job_spec(ds["id"], model={"arch": "transformer"}, augment={"hflip": True}))
    assert refused.status_code == 422 and "augment applies to images only; dataset is text" in refused.text
    refused = client.post(
        "/v1/jobs", json=job_spec(ds["id"], model={"arch": "transformer"}, variants=[{"norm": "switchable"}])
    )
    assert refused.status_code == 422 and "the transformer takes ln, rmsnorm" in refused.text
    refused = client.post("/v1/jobs", json=job_spec(ds["id"], model={"arch": "transformer", "width": 10}))
    assert refused.status_code == 422 and "multiple of heads" in refused.text
    auto = client.post("/v1/jobs", json=job_spec(ds["id"], model={"arch": "auto", "width": 8, "heads": 2}))
    assert auto.status_code == 202, auto.text
    assert auto.json()["spec"]["model"]["arch"] == "transformer"


@pytest.mark.e2e
def test_a_text_job_runs_end_to_end(client: TestClient, worker: WorkerProcess) -> None:
    ds = upload(client, "reviews.csv", csv_bytes(texts(40)), kind="text", max_length="32")
    assert ds.status_code == 201, ds.text
    spec = job_spec(
        ds.json()["id"],
        model={"arch": "transformer", "width": 16, "layers": 1, "heads": 4},
        variants=[{"norm": n} for n in NORMS],
        batch_sizes=[4],
        budget={"epochs": 1},
    )
    job, results = run_job(client, spec)
    job_id = job["id"]
    assert job["status"] == "succeeded", results["runs"]
    assert {r["variant"] for r in results["runs"]} == set(NORMS)
    assert all(r["status"] == "succeeded" and r["tokens_seen"] > r["samples_seen"] for r in results["runs"])
    assert len({r["tokens_seen"] for r in results["runs"]}) == 1  # one seed: the same tokens for every variant
    assert all(r["tokens_per_s"] > 0 for r in results["runs"])
    report = client.get(f"/v1/jobs/{job_id}/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    for variant in NORMS:
        assert variant in report.text
    assert "transformer (width 16, layers 1, heads 4)" in report.text  # only the settings that apply to it


def test_the_cli_uploads_texts(url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:  # noqa: F811
    path = write(tmp_path, "t.jsonl", jsonl_bytes(texts(10)))
    code, _, err = run(capsys, "--url", url, "datasets", "upload", str(path), "--max-length", "24")
    assert code == 0, err
    assert "text 24, 2 classes, 20 samples" in err
    csv_path = write(tmp_path, "t.csv", csv_bytes(texts(10), header="body,label"))
    code, _, err = run(
        capsys, "--url", url, "datasets", "upload", str(csv_path), "--kind", "text", "--text-column", "body"
    )
    assert code == 0, err


@pytest.mark.e2e
@pytest.mark.system
def test_a_text_jobs_report_page_in_headless_chromium(
    settings: Settings,
    worker: WorkerProcess,
    browser: Browser,  # noqa: F811
    axe_source: str,  # noqa: F811
) -> None:
    """The UI's job page for a text job: the report renders in its frame with every variant, accessibly, and the
    new-comparison form's `auto` resolves to the transformer for the text dataset."""
    with live_server(settings) as base, httpx.Client(base_url=base, timeout=60) as http:
        ds = http.post("/v1/datasets", files={"file": ("reviews.csv", csv_bytes(texts(30)))}, data={"kind": "text"})
        assert ds.status_code == 201, ds.text
        spec = job_spec(
            ds.json()["id"],
            name="text tiny",
            model={"arch": "transformer", "width": 16, "layers": 1, "heads": 4},
            variants=[{"norm": n} for n in ("ln", "rmsnorm", "bn")],
            batch_sizes=[4],
            budget={"epochs": 1},
        )
        job = http.post("/v1/jobs", json=spec)
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        deadline = time.monotonic() + 240
        while http.get(f"/v1/jobs/{job_id}").json()["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, "the text job did not finish"
            time.sleep(1)
        with tab(browser, base, axe_source) as s:
            s.goto(f"#/jobs/{job_id}")
            expect(title(s.page, "text tiny")).to_be_visible()
            report = s.page.frame_locator("#report-frame")
            expect(report.locator("#verdicts")).to_be_visible()
            expect(report.locator("[data-status]").first).to_have_attribute("data-status", "succeeded")
            for variant in ("ln", "rmsnorm", "bn"):
                expect(report.get_by_role("cell", name=variant, exact=True).first).to_be_visible()
            s.check_accessibility("text job page")
            s.shot("text-job-report")
            s.goto(f"#/new?dataset={ds.json()['id']}")
            expect(s.page.get_by_text("auto → transformer for this dataset.", exact=False)).to_be_visible()
            s.check_clean()
