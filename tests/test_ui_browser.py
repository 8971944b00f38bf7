"""The browser UI at `/`, clicked through in a real Chromium (Debian's, driven by Playwright) against a real API
server and worker: upload a dataset, submit a comparison, watch it finish in the live list, read its report,
cancel and retry a job; with API keys off and on. axe-core checks every page; screenshots land in
test-artifacts/ui/."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.config import Settings
from app.db import session_factory
from app.services.keys import create_key
from tests.factories import image_npz
from tests.support import ROOT, WorkerProcess, live_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
AXE_VERSION = "4.14.1"  # pinned: another version may judge differently
AXE_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "normbench-test"
BLOCKING_IMPACTS = {"serious", "critical"}
JOB_TIMEOUT_MS = 240_000


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def axe_source() -> str:
    """axe-core's browser build, from the npm registry once (`npm pack`), then from a cache directory."""
    target = AXE_CACHE / f"axe-core-{AXE_VERSION}.min.js"
    if not target.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(f"npm is missing: install Node.js, or put axe.min.js {AXE_VERSION} at {target}")
        AXE_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "pack", f"axe-core@{AXE_VERSION}", "--pack-destination", str(AXE_CACHE), "--silent"],
            check=True,
            capture_output=True,
            timeout=300,
        )
        tarball = AXE_CACHE / f"axe-core-{AXE_VERSION}.tgz"
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/axe.min.js")
            assert member is not None
            target.write_bytes(member.read())
        tarball.unlink()
    return target.read_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"headless Chromium is missing ({CHROMIUM}): run `make deps`, which installs Debian's `chromium` "
            "package (scripts/install-deps.sh), or `apt-get install -y chromium`"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Session:
    """A browser tab and what it saw: requests, console messages, uncaught errors."""

    page: Page
    base: str
    axe: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def goto(self, route: str) -> None:
        self.page.goto(f"{self.base}/{route}")

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        # A full-page shot resizes the viewport, and Chromium answers a resize by scrolling a focused text field
        # back into view at the next focus change: a click right after would lose its mouseup. Blur first.
        self.page.evaluate("() => document.activeElement && document.activeElement.blur()")
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000, path
        print(f"screenshot: {path}")
        return path

    def check_accessibility(self, name: str) -> None:
        """axe-core in the page: no violation of serious or critical impact."""
        if not self.page.evaluate("() => typeof window.axe === 'object'"):
            self.page.evaluate(self.axe)  # devtools evaluation: the page's CSP rightly forbids injected scripts
        result: dict[str, Any] = self.page.evaluate(
            "async () => await axe.run(document, {iframes: false, resultTypes: ['violations']})"
        )
        blocking = [
            f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:5]}"
            for v in result["violations"]
            if v["impact"] in BLOCKING_IMPACTS
        ]
        assert not blocking, f"{name}: " + "\n".join(blocking)

    def api_requests(self, method: str, path: str) -> list[tuple[str, str, dict[str, str]]]:
        return [r for r in self.requests if r[0] == method and r[1].split("?")[0] == self.base + path]

    def check_clean(self) -> None:
        csp = [m for m in self.console if "Content Security Policy" in m or "Refused to" in m]
        assert not csp, "\n".join(csp)
        assert not self.errors, self.errors


@contextmanager
def tab(browser: Browser, base: str, axe: str) -> Iterator[Session]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    s = Session(page, base, axe)
    page.on("request", lambda r: s.requests.append((r.method, r.url, r.headers)))
    page.on("console", lambda m: s.console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: s.errors.append(str(e)))
    try:
        yield s
    finally:
        context.close()


def drop_file(page: Page, selector: str, name: str, data: bytes) -> None:
    """Drag a file onto `selector` as a person would from the desktop: dragover, then drop with a DataTransfer."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "application/octet-stream"}));
            return dt;
        }""",
        [name, base64.b64encode(data).decode()],
    )
    page.dispatch_event(selector, "dragenter", {"dataTransfer": transfer})
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def fill_job(
    page: Page, *, name: str, arch: str, norms: dict[str, dict[str, str]], batch: str, seeds: str, epochs: int
) -> None:
    page.get_by_label("Job name (optional)", exact=True).fill(name)
    page.get_by_label("Architecture", exact=True).select_option(arch)
    for box in page.locator("#variants input[type=checkbox]").all():
        box.set_checked(box.get_attribute("value") in norms)
    for norm, params in norms.items():
        for param, value in params.items():
            page.locator(f"#param-{norm}-{param}").fill(value)
    page.get_by_label("Batch sizes", exact=True).fill(batch)
    page.get_by_label("Seeds", exact=True).fill(seeds)
    page.get_by_label("Epochs", exact=True).fill(str(epochs))


def title(page: Page, name: str):  # type: ignore[no-untyped-def]
    return page.get_by_role("heading", name=name, exact=True, level=1)


def job_row(page: Page, name: str):  # type: ignore[no-untyped-def]
    return page.locator("tr[data-job]", has=page.get_by_role("link", name=name, exact=True))


# ------------------------------------------------------------------------------------------- tests


def test_ui_pages_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["script-src"] == "'self'" and csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert "unsafe" not in page.headers["content-security-policy"]
    assert "<script>" not in page.text and '<script src="/ui/app.js"' in page.text  # no inline script
    assert "http" not in page.text.split("<body>")[0]  # nothing from another origin
    frame = client.get("/ui/report-frame.html").headers["content-security-policy"]
    assert "script-src" not in frame and "default-src 'none'" in frame  # no script may run in the report frame
    js = client.get("/ui/app.js")
    assert (
        js.headers["content-type"].startswith("text/javascript") and js.headers["x-content-type-options"] == "nosniff"
    )
    assert client.get("/ui/app.css").status_code == 200
    for bad in ("/ui/router.py", "/ui/..%2Frouter.py", "/ui/index.html", "/ui/nothing.js"):
        assert client.get(bad).status_code == 404, bad
    catalogue = client.get("/ui/catalogue.json").json()
    assert {n["name"] for n in catalogue["norms"]} >= {"bn", "gn", "ln"}
    assert catalogue["defaults"]["budget"]["epochs"] == 10 and catalogue["require_api_keys"] is False
    assert "/" not in client.get("/openapi.json").json()["paths"]  # the UI is not part of the API's schema


@pytest.mark.e2e
@pytest.mark.system
def test_ui_keys_off_upload_submit_watch_report_cancel_retry(
    settings: Settings, worker: WorkerProcess, browser: Browser, axe_source: str
) -> None:
    with live_server(settings) as base, tab(browser, base, axe_source) as s:
        page = s.page
        s.goto("")
        expect(title(page, "Jobs")).to_be_visible()
        expect(page.get_by_text("No jobs yet")).to_be_visible()

        # Keyboard: the skip link comes first; the main navigation is reachable and moves focus to the page.
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
        for _ in range(8):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.textContent") == "Datasets":
                break
        page.keyboard.press("Enter")
        expect(title(page, "Datasets")).to_be_focused()
        assert page.url.endswith("#/datasets")

        # A refused upload (dragged and dropped) shows the server's own words.
        junk = b"this is not a dataset"
        refusal = httpx.post(f"{base}/v1/datasets", files={"file": ("broken.npz", junk)}).json()["detail"]
        drop_file(page, "#dropzone", "broken.npz", junk)
        expect(page.locator("#upload-error")).to_have_text(refusal)

        # A good one, dropped too: progress to 100%, then the list shows its shape, classes, splits and size.
        drop_file(page, "#dropzone", "bars.npz", image_npz())
        expect(page.locator("#upload-notice")).to_contain_text("Stored bars.npz")
        assert page.locator("#upload-progress").evaluate("p => p.value") == 1
        row = page.locator("tr", has_text="bars.npz")
        for text in ("image", "1×8×8", "3 (0, 1, 2)", "train 120", "KiB"):
            expect(row).to_contain_text(text)
        s.check_accessibility("datasets")
        s.shot("datasets")

        # New comparison from the dataset's row. An invalid combination: the API's 422 next to the variant.
        row.get_by_role("link", name="Compare on it").click()
        expect(title(page, "New comparison")).to_be_visible()
        fill_job(page, name="ui tiny", arch="mlp", norms={"bn": {}, "in": {}}, batch="8", seeds="0", epochs=1)
        expect(page.locator("#runs-count")).to_contain_text("2 runs = 2 variants × 1 batch size × 1 seed")
        page.get_by_role("button", name="Submit the comparison").click()
        expect(page.locator("#norm-in-error")).to_contain_text("variants[1]: norm 'in' needs spatial positions")
        expect(page.locator("#norm-in")).to_be_focused()
        assert len(s.api_requests("POST", "/v1/jobs")) == 1  # refused: nothing was submitted
        # A schema error (FastAPI's 422) lands beside its field too, and the earlier message is gone.
        fill_job(page, name="ui tiny", arch="mlp", norms={"bn": {}}, batch="8, 8", seeds="0", epochs=1)
        page.get_by_role("button", name="Submit the comparison").click()
        expect(page.locator("#batch-sizes-error")).to_contain_text(
            "batch_sizes: Value error, batch sizes must be distinct"
        )
        expect(page.get_by_label("Batch sizes", exact=True)).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#norm-in-error")).to_be_empty()

        fill_job(
            page, name="ui tiny", arch="cnn", norms={"bn": {}, "gn": {"groups": "2, 4"}}, batch="8", seeds="0", epochs=1
        )
        page.get_by_label("Width (channels of the first stage)", exact=True).fill("8")
        page.get_by_text("Advanced budget and training settings").click()
        page.get_by_label("Log the training loss every N steps", exact=True).fill("5")
        # 120 samples, 12 held out for validation, 108 trained on: 104 per epoch, a multiple of 8.
        expect(page.locator("#runs-count")).to_contain_text("3 runs = 3 variants × 1 batch size × 1 seed")
        expect(page.locator("#work-estimate")).to_contain_text("312 training samples (3 runs × 1 epochs × 104")
        s.check_accessibility("new comparison")
        s.shot("new-comparison")
        page.get_by_role("button", name="Submit the comparison").click()
        submitted = len(s.requests)

        # The live list: the job finishes through its event stream, not by polling.
        expect(title(page, "Jobs")).to_be_visible()
        expect(page.get_by_role("status").first).to_contain_text("Submitted ui tiny")
        tiny = job_row(page, "ui tiny")
        expect(tiny.locator("[data-status]")).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
        expect(tiny).to_contain_text("3/3 finished · 3 succeeded")
        expect(page.locator("#job-counts")).to_contain_text("1 succeeded")
        job_id = tiny.get_attribute("data-job")
        since = Session(page, base, axe_source, requests=s.requests[submitted:])
        assert since.api_requests("GET", f"/v1/jobs/{job_id}/events"), "no event stream was opened"
        # One list, one stream (a reconnect at most), the job read once when it finished: no polling loop.
        assert len(since.api_requests("GET", "/v1/jobs")) == 1
        assert len(since.api_requests("GET", f"/v1/jobs/{job_id}/events")) <= 2
        assert len(since.api_requests("GET", f"/v1/jobs/{job_id}")) <= 2
        s.check_accessibility("jobs")
        s.shot("jobs")

        # The job page is the report.
        tiny.get_by_role("link", name="Report of ui tiny").click()
        expect(title(page, "ui tiny")).to_be_visible()
        report = page.frame_locator("#report-frame")
        expect(report.locator("#verdicts")).to_be_visible()
        expect(report.locator("[data-status]").first).to_have_attribute("data-status", "succeeded")
        expect(page.locator("#job-status")).to_have_text("succeeded")
        s.check_accessibility("job page")
        s.shot("job-report")

        # A second, longer job: cancel it while it runs, retry it, cancel again.
        s.goto("#/new?dataset=digits")
        fill_job(page, name="ui long", arch="mlp", norms={"bn": {}}, batch="2", seeds="0, 1", epochs=40)
        page.get_by_role("button", name="Submit the comparison").click()
        long = job_row(page, "ui long")
        expect(long.locator("[data-status]")).to_have_attribute("data-status", "running", timeout=JOB_TIMEOUT_MS)
        expect(long).to_contain_text("running")
        long.get_by_role("button", name="Cancel ui long").click()
        expect(long.get_by_role("button", name="Cancel ui long")).to_be_disabled()
        # Running runs stop within seconds; the stream says when, and the job turns `cancelled`.
        expect(long.locator("[data-status]")).to_have_attribute("data-status", "cancelled", timeout=60_000)
        expect(long).to_contain_text("2/2 finished · 2 cancelled")
        long.get_by_role("button", name="Retry ui long").click()
        expect(long.locator("[data-status]")).to_have_attribute("data-status", "running", timeout=JOB_TIMEOUT_MS)
        expect(long.get_by_role("button", name="Retry ui long")).to_be_disabled()
        s.shot("jobs-retried")

        # Its page while it runs: the report is rebuilt when the stream reports an epoch (the page itself never
        # reloads), and it can be cancelled from there.
        long.get_by_role("link", name="Report of ui long").click()
        expect(title(page, "ui long")).to_be_visible()
        report = page.frame_locator("#report-frame")
        expect(report.locator("[data-status]").first).to_have_attribute("data-status", "running")
        with page.expect_request(lambda r: r.url.split("?")[0].endswith("/report"), timeout=JOB_TIMEOUT_MS) as rebuilt:
            pass
        assert "refresh=0" in rebuilt.value.url
        expect(page.locator("#job-live")).to_have_text("● live")
        s.shot("job-live")
        page.get_by_role("button", name="Cancel", exact=True).click()
        expect(page.locator("#job-status")).to_contain_text("cancelling")
        expect(page.locator("#job-status [data-status]")).to_have_attribute("data-status", "cancelled", timeout=60_000)
        expect(report.locator("[data-status]").first).to_have_attribute("data-status", "cancelled", timeout=20_000)
        expect(page.get_by_role("button", name="Retry", exact=True)).to_be_enabled()
        s.check_clean()


@pytest.mark.e2e
@pytest.mark.system
def test_ui_with_api_keys(settings: Settings, worker: WorkerProcess, browser: Browser, axe_source: str) -> None:
    keyed = settings.model_copy(update={"require_api_keys": True})
    with session_factory(keyed.resolved_database_url)() as db:
        token = create_key(db, "alice", "browser").token
    with live_server(keyed) as base, tab(browser, base, axe_source) as s:
        page = s.page
        s.goto("#/datasets")
        # No key yet: the API's 401 sends the user to the key form, with the server's message.
        expect(title(page, "API key")).to_be_visible()
        expect(page.locator("#key-error")).to_contain_text("this server requires an API key")
        s.check_accessibility("key")
        s.shot("key")
        page.get_by_label("API key", exact=True).fill("nb_000000000000_" + "0" * 64)
        page.get_by_role("button", name="Use this key").click()
        expect(page.locator("#key-error")).to_contain_text("API key")
        page.get_by_label("API key", exact=True).fill(token)
        page.get_by_role("button", name="Use this key").click()
        expect(title(page, "Datasets")).to_be_visible()  # back where the user was going
        expect(page.locator("tr", has_text="digits")).to_be_visible()
        assert page.evaluate("() => sessionStorage.getItem('normbench.apiKey')") == token

        page.locator("#ds-file").set_input_files(
            files=[{"name": "keyed.npz", "mimeType": "application/octet-stream", "buffer": image_npz()}]
        )
        expect(page.locator("#upload-notice")).to_contain_text("Stored keyed.npz")
        page.get_by_role("button", name="Delete keyed.npz").click()
        page.get_by_role("button", name="Confirm: delete keyed.npz").click()
        expect(page.locator("#upload-notice")).to_have_text("Deleted keyed.npz.")
        expect(page.locator("tr", has_text="keyed.npz")).to_have_count(0)

        s.goto("#/new?dataset=digits")
        fill_job(page, name="keyed tiny", arch="mlp", norms={"bn": {}}, batch="32", seeds="0", epochs=1)
        page.get_by_role("button", name="Submit the comparison").click()
        row = job_row(page, "keyed tiny")
        expect(row.locator("[data-status]")).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
        row.get_by_role("link", name="Report of keyed tiny").click()
        report = page.frame_locator("#report-frame")
        expect(report.locator("#verdicts")).to_be_visible()
        # The report's data links need the key too: the page fetches them with it and opens what came back.
        with page.context.expect_page() as popup:
            report.get_by_role("link", name="results JSON").click()
        popup.value.wait_for_load_state()
        assert popup.value.url.startswith("blob:") and '"complete":true' in popup.value.content()

        # The key went out as a header on every API request (the event stream's too), never in a URL.
        api_calls = [r for r in s.requests if r[1].startswith(f"{base}/v1/")]
        assert any(r[1].endswith("/events") for r in api_calls)
        assert all(token not in r[1] for r in s.requests)
        authorised = [r for r in api_calls if r[2].get("authorization") == f"Bearer {token}"]
        assert len(authorised) >= len(api_calls) - 2  # the first two went out before the key was entered (401)

        # Forgetting the key: the next request is refused and the form comes back.
        s.goto("#/key")
        page.get_by_role("button", name="Forget the key").click()
        s.goto("#/jobs")
        expect(title(page, "API key")).to_be_visible()
        s.check_clean()
