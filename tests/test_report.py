"""The HTML report and the SVG plots, against the real Postgres, with finished training simulated by
writing run rows and metric points directly (no worker); and the report rendered in headless Chromium."""

from __future__ import annotations

import html
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
import zlib
from collections import defaultdict
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.services import plots
from app.tables import Run
from tests import support
from tests.factories import FakeRun, finish_job, image_npz, job_spec, upload

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
HOSTILE_NAME = "<script>alert(1)</script>"
SVG_NS = "{http://www.w3.org/2000/svg}"

EPOCHS = 10
SEEDS = [0, 1, 2]
BATCH_SIZES = [2, 4, 8, 16, 32]
VARIANTS = [{"norm": "bn"}, {"norm": "gn", "groups": 16}, {"norm": "ln"}]
LABELS = ["bn", "gn(16)", "ln"]
# Expected final accuracy per variant and batch size, shaped like the design's reference runs (MLP on digits):
# BatchNorm collapses at batch 2, GroupNorm and LayerNorm do not care.
TRUE_ACC = {
    "bn": {2: 0.806, 4: 0.925, 8: 0.980, 16: 0.978, 32: 0.974},
    "gn(16)": {2: 0.974, 4: 0.975, 8: 0.973, 16: 0.972, 32: 0.970},
    "ln": {2: 0.976, 4: 0.976, 8: 0.975, 16: 0.973, 32: 0.972},
}
TRAIN_SAMPLES = 1440  # divisible by every batch size: every run consumes the same samples
DIVERGED = {("bn", 2, 2)}  # (variant, batch size, seed) whose loss became NaN at epoch 4


def spec(**overrides: object) -> dict[str, object]:
    return job_spec(
        "digits",
        **{
            "variants": VARIANTS,
            "batch_sizes": BATCH_SIZES,
            "seeds": SEEDS,
            "budget": {"epochs": EPOCHS},
            "model": {"arch": "mlp", "hidden": [256, 256]},
            **overrides,
        },
    )


def final_acc(variant: str, batch_size: int, seed: int) -> float:
    rng = np.random.default_rng(zlib.crc32(f"{variant}/{batch_size}/{seed}".encode()))
    spread = 0.02 if (variant, batch_size) == ("bn", 2) else 0.004
    return float(np.clip(TRUE_ACC[variant][batch_size] + rng.normal(0, spread), 0, 1))


def epoch_curve(final: float, batch_size: int, seed: int) -> list[float]:
    """Per-epoch val_acc rising towards `final` (reached at the last epoch), a little seed noise on the way."""
    rng = np.random.default_rng(zlib.crc32(f"curve/{final}/{batch_size}/{seed}".encode()))
    rate = 0.9 if batch_size <= 4 else 0.6
    out = []
    for e in range(1, EPOCHS + 1):
        clean = final - (final - 0.12) * math.exp(-rate * e)
        noise = 0.0 if e == EPOCHS else rng.normal(0, 0.04) * (EPOCHS - e) / EPOCHS
        out.append(float(np.clip(clean + noise, 0, 1)))
    return out


def fabricate(settings: Settings, job_id: str, leave_running: int = 0) -> None:
    """Write what training would have written: statuses, final metrics, environment, per-epoch points."""
    finish_job(settings, job_id, lambda run, position: outcome(run, running=position < leave_running))


def outcome(run: Run, running: bool) -> FakeRun:
    env = {"torch": "2.13.0+cpu", "python": "3.11.2", "device": "cpu", "threads": 1}
    per_epoch = TRAIN_SAMPLES // run.batch_size
    final = final_acc(run.variant, run.batch_size, run.seed)
    curve = epoch_curve(final, run.batch_size, run.seed)
    losses = [1.0 - a + 0.05 for a in curve]
    if running:
        columns = {"steps_done": per_epoch * 3, "environment": env}
        return FakeRun("running", columns).per_epoch("val_acc", per_epoch, curve[:3])
    if (run.variant, run.batch_size, run.seed) in DIVERGED:
        error = "training loss became non-finite at step 2900 (epoch 4)"
        return (
            FakeRun("diverged", {"error": error, "steps_done": per_epoch * 4, "environment": env})
            .per_epoch("val_acc", per_epoch, curve[:3])
            .per_epoch("val_loss", per_epoch, [*losses[:3], float("nan")])
        )
    columns = {
        "steps_done": per_epoch * EPOCHS,
        "samples_seen": per_epoch * EPOCHS * run.batch_size,
        "epochs_done": EPOCHS,
        "wall_time_s": 3.0 + 40 / run.batch_size,
        "environment": env,
        "final_metrics": {
            "val_acc": final,
            "val_loss": losses[-1],
            "train_loss": losses[-1] / 2,
            "images_per_s": 400.0 * run.batch_size,
        },
    }
    return FakeRun("succeeded", columns).per_epoch("val_acc", per_epoch, curve).per_epoch("val_loss", per_epoch, losses)


@pytest.fixture
def finished_job(client: TestClient, settings: Settings) -> str:
    resp = client.post("/v1/jobs", json=spec(name=HOSTILE_NAME))
    assert resp.status_code == 202, resp.text
    job_id: str = resp.json()["id"]
    fabricate(settings, job_id)
    return job_id


class ChartCounter(HTMLParser):
    """Per `<svg data-chart>`: the series groups, keyed by panel (batch size) where the chart has panels."""

    def __init__(self) -> None:
        super().__init__()
        self.chart: str | None = None
        self.panel: str | None = None
        self.series: dict[str, dict[str | None, list[str]]] = defaultdict(lambda: defaultdict(list))
        self.tags: dict[str, int] = defaultdict(int)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags[tag] += 1
        if tag == "svg" and a.get("data-chart"):
            self.chart = a["data-chart"]
            self.series[self.chart]  # noqa: B018 - a chart with no series still counts as rendered
        elif tag == "g" and self.chart and "panel" in (a.get("class") or "").split():
            self.panel = a.get("data-batch-size")
        elif tag == "g" and self.chart and "series" in (a.get("class") or "").split():
            self.series[self.chart][self.panel].append(a.get("data-series") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self.chart = self.panel = None


def charts_in(page: str) -> ChartCounter:
    parser = ChartCounter()
    parser.feed(page)
    return parser


def assert_charts(counter: ChartCounter, variants: list[str], batch_sizes: list[int]) -> None:
    acc = counter.series["accuracy-vs-batch"]
    assert list(acc) == [None] and acc[None] == variants, acc
    curves = counter.series["curves"]
    assert set(curves) == {str(b) for b in batch_sizes}, curves
    for b in batch_sizes:
        assert curves[str(b)] == variants, (b, curves[str(b)])


# ------------------------------------------------------------------------------------------------ HTTP


def test_report_of_a_finished_job(client: TestClient, finished_job: str) -> None:
    resp = client.get(f"/v1/jobs/{finished_job}/report")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/html")
    assert "script-src" not in resp.headers["content-security-policy"]  # default-src 'none': no script at all
    assert resp.headers["content-security-policy"].startswith("default-src 'none'")
    page = resp.text

    # the hostile job name is text, never markup
    assert HOSTILE_NAME not in page and "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page

    # the verdicts and the numbers behind them
    results = client.get(f"/v1/jobs/{finished_job}/results").json()
    assert results["complete"] and results["variants"] == LABELS
    beats = [v for v in results["verdicts"] if v.startswith("At batch 2, gn(16) beats bn by")]
    assert beats and all(v in page for v in beats)
    assert "bn diverged in 1 of 3 seeds at batch 2" in page
    assert any(v.startswith("bn loses") for v in results["verdicts"])
    for v in results["verdicts"]:
        assert html.escape(v) in page, v

    # finished: no reload, no progress bar
    assert 'http-equiv="refresh"' not in page and 'role="progressbar"' not in page
    counter = charts_in(page)
    assert_charts(counter, LABELS, BATCH_SIZES)
    # the tables: glance, comparisons, statistics (one row per cell), spec and environment
    for section in ("verdicts", "glance", "comparisons", "sensitivity", "statistics", "runs", "spec", "environment"):
        assert f'id="{section}"' in page, section
    assert page.count('<tr data-variant="') == len(LABELS) + len(LABELS) * len(BATCH_SIZES)
    assert page.count('<tr data-outcome="') == (len(LABELS) - 1) * len(BATCH_SIZES)
    assert "2.13.0+cpu" in page and "&quot;batch_sizes&quot;: [" in page
    # self-contained: nothing is fetched from anywhere (the SVG namespace is a name, not a fetch)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "external reference"
    assert "<link" not in page and "<img" not in page and "@import" not in page


def test_report_of_a_running_job_refreshes_and_shows_progress(client: TestClient, settings: Settings) -> None:
    hostile_dataset = '<img src=x onerror="alert(2)">'
    resp = upload(client, "bars.npz", image_npz(), name=hostile_dataset)
    assert resp.status_code == 201, resp.text
    queued = client.post("/v1/jobs", json=job_spec(resp.json()["id"], name="queued & waiting")).json()["id"]
    page = client.get(f"/v1/jobs/{queued}/report").text
    assert hostile_dataset not in page and "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
    assert "queued &amp; waiting" in page
    assert '<meta http-equiv="refresh" content="5">' in page and 'aria-valuenow="0"' in page
    assert "No finished runs yet" in page and "Partial results (0 of 4 runs finished)" in page
    counter = charts_in(page)
    assert counter.series["accuracy-vs-batch"][None] == ["bn", "gn(4)"]  # lines drawn as soon as there is data
    assert "curves" in counter.series  # rendered, with no panel series yet

    running = client.post("/v1/jobs", json=spec()).json()["id"]
    fabricate(settings, running, leave_running=4)
    resp = client.get(f"/v1/jobs/{running}/report", params={"refresh": 30})
    page = resp.text
    assert resp.headers["cache-control"] == "no-store"
    assert '<meta http-equiv="refresh" content="30">' in page
    progress = re.search(r'role="progressbar"[^>]*aria-valuenow="(\d+)"', page)
    assert progress and 0 < int(progress.group(1)) < 100
    assert "41 of 45 runs finished" in page and "Partial results (41 of 45 runs finished)" in page
    assert 'http-equiv="refresh"' not in client.get(f"/v1/jobs/{running}/report", params={"refresh": 0}).text


def test_plots_as_svg(client: TestClient, finished_job: str) -> None:
    base = f"/v1/jobs/{finished_job}/plots"
    for path, params in (
        ("accuracy.svg", {}),
        ("accuracy.svg", {"interval": "std"}),
        ("curves.svg", {"metric": "val_acc"}),
        ("curves.svg", {"metric": "val_loss", "band": "std"}),
        ("curves.svg", {"metric": "<b>no such metric</b>"}),
    ):
        resp = client.get(f"{base}/{path}", params=params)
        assert resp.status_code == 200, (path, params, resp.text)
        assert resp.headers["content-type"] == "image/svg+xml"
        root = ET.fromstring(resp.text)  # a standalone document must be well-formed XML
        assert root.tag == f"{SVG_NS}svg" and "<script" not in resp.text
        series = [g for g in root.iter(f"{SVG_NS}g") if "series" in (g.get("class") or "").split()]
        if root.get("data-chart") == "accuracy-vs-batch":
            assert [g.get("data-series") for g in series] == LABELS
        elif params["metric"] == "<b>no such metric</b>":
            assert series == [] and "&lt;b&gt;no such metric&lt;/b&gt;" in resp.text
        else:
            assert len(series) == len(LABELS) * len(BATCH_SIZES)
    loss = client.get(f"{base}/curves.svg", params={"metric": "val_loss"}).text
    assert "validation loss" in loss and not re.search(r"(?i)\b(nan|inf)\b", loss)  # the NaN point is left out
    for bad in ({"interval": "sd"},):
        assert client.get(f"{base}/accuracy.svg", params=bad).status_code == 422
    assert client.get(f"{base}/curves.svg", params={"band": "iqr"}).status_code == 422
    assert client.get(f"/v1/jobs/{finished_job}/report", params={"baseline": "batchnorm"}).status_code == 422
    for path in ("report", "plots/accuracy.svg", "plots/curves.svg"):
        resp = client.get(f"/v1/jobs/missing/{path}")
        assert resp.status_code == 404 and resp.json()["error"] == "not_found", path


def test_report_baseline_and_interval_options(client: TestClient, finished_job: str) -> None:
    page = client.get(f"/v1/jobs/{finished_job}/report", params={"baseline": "ln", "interval": "std"}).text
    assert "Comparisons against the baseline (ln)" in page and "error bars ±1 std" in page
    assert page.count('<tr data-outcome="') == 2 * len(BATCH_SIZES)


def test_openapi_documents_the_report_endpoints(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, media in (
        ("/v1/jobs/{job_id}/report", "text/html"),
        ("/v1/jobs/{job_id}/plots/accuracy.svg", "image/svg+xml"),
        ("/v1/jobs/{job_id}/plots/curves.svg", "image/svg+xml"),
    ):
        op = paths[path]["get"]
        assert op["summary"] and len(op["description"]) > 100 and op["tags"] == ["reports"]
        assert list(op["responses"]["200"]["content"]) == [media]
        assert list(op["responses"]["404"]["content"]) == ["application/json"]  # errors stay JSON
        assert all(p.get("description") for p in op["parameters"] if p["in"] == "query"), path


def test_charts_escape_labels_and_survive_odd_data() -> None:
    hostile = '"><script>x</script>'
    svg = plots.accuracy_chart(
        [hostile, "b"],
        [1, 4096],
        {
            (hostile, 1): plots.CellPoint(50.0, 40.0, 60.0, 3, 3),
            (hostile, 4096): plots.CellPoint(None, None, None, 0, 3, diverged=3),
            ("b", 1): plots.CellPoint(100.0, 100.0, 100.0, 3, 3),
        },
    )
    root = ET.fromstring(svg)
    assert "<script" not in svg and [
        g.get("data-series") for g in root.iter(f"{SVG_NS}g") if g.get("class") == "series"
    ] == [
        hostile,
        "b",
    ]
    assert "✕: no seed has a result." in svg
    over = ET.fromstring(plots.accuracy_chart(["a"], [8], {("a", 8): plots.CellPoint(98.0, 95.0, 103.0, 2, 2)}))
    ticks = [float(t.text) for t in over.iter(f"{SVG_NS}text") if t.text and re.fullmatch(r"[\d.]+", t.text)]
    assert max(ticks) == 100  # accuracy axes stop at 100% even when an interval pokes past it
    flat = plots.curves_chart(["a"], [2], {("a", 2): [plots.BandPoint(1.0, 5.0, None, None)]}, title="t")
    ET.fromstring(flat)
    assert plots.nice_ticks(0.8, 0.97, 5)[2] == pytest.approx([0.8, 0.85, 0.9, 0.95, 1.0])
    assert plots.nice_ticks(3, 3)[0] < 3 < plots.nice_ticks(3, 3)[1]


# ------------------------------------------------------------------------------------------------ browser


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    with support.live_server(settings) as url:
        yield url


def chromium(profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        pytest.fail(
            f"headless Chromium is missing ({CHROMIUM}): run `make deps`, which installs Debian's `chromium` "
            "package (scripts/install-deps.sh), or `apt-get install -y chromium`"
        )
    cmd = [
        CHROMIUM if Path(CHROMIUM).exists() else str(shutil.which("chromium")),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.system
def test_report_renders_in_headless_chromium(
    client: TestClient, settings: Settings, live_server: str, tmp_path: Path
) -> None:
    job_id = client.post("/v1/jobs", json=spec(name="MLP on digits: which norm at small batch?")).json()["id"]
    fabricate(settings, job_id)
    url = f"{live_server}/v1/jobs/{job_id}/report"

    dom = chromium(tmp_path / "profile-dom", "--dump-dom", url).stdout
    assert "MLP on digits" in dom, dom[:2000]
    counter = charts_in(dom)  # the DOM the browser built, after parsing and layout
    assert_charts(counter, LABELS, BATCH_SIZES)
    assert counter.tags["svg"] >= 2 and counter.tags["path"] > 30

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    chromium(tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2000", url)
    assert shot.exists(), "chromium wrote no screenshot"
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000, len(data)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 2000)
    # the whole page too, for a person reading the artifacts
    chromium(tmp_path / "profile-full", f"--screenshot={ARTIFACTS / 'report-full.png'}", "--window-size=1280,5600", url)
