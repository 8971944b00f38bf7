"""The `normbench` CLI against a live server (uvicorn in a thread on the real Postgres/Redis) and a real worker."""

from __future__ import annotations

import csv
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from app import cli
from app.config import Settings
from app.db import session_factory
from app.main import create_app
from app.services import keys
from tests.factories import image_npz
from tests.support import ROOT, WorkerProcess


def serve(settings: Settings) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture
def url(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.delenv("NORMBENCH_URL", raising=False)
    monkeypatch.delenv("NORMBENCH_API_KEY", raising=False)
    yield from serve(settings)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------- against a worker


@pytest.mark.e2e
def test_submit_waits_then_prints_the_table_and_verdicts(
    url: str, worker: WorkerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run(
        capsys,
        "--url",
        url,
        "submit",
        "digits",
        "--variants",
        "bn,gn:4",
        "--batch-sizes",
        "8",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--arch",
        "mlp",
        "--name",
        "cli smoke",
        "--poll-interval",
        "0.2",
    )
    assert code == 0, err
    job_id = re.search(r"submitted job ([0-9a-f]+): 4 runs on digits", err).group(1)  # type: ignore[union-attr]
    assert "runs 4/4  succeeded" in err and "100.0%" in err  # the progress bar's last line
    lines = out.splitlines()
    assert lines[0].startswith("final validation accuracy (%), mean ± half-width of the 95% t-interval over 2 seed")
    assert "batch 8" in lines[1]
    rows = {line.split()[0]: line for line in lines[3:5]}
    assert set(rows) == {"bn", "gn(4)"}
    # mean ± half-width, or the interval's ends when it was clipped to 0–100%, or no interval at zero spread
    cell = r"\d+\.\d( ± \d+\.\d| \(\d+\.\d–\d+\.\d\)| \(no spread\))$"
    assert all(re.search(cell, row) for row in rows.values()), rows
    verdicts = lines[lines.index("verdicts:") + 1 : lines.index("how to read this:") - 1]
    assert verdicts and all(v.startswith("  - ") for v in verdicts)
    assert any("gn(4)" in v and "bn" in v for v in verdicts)

    # results: the same table, the JSON document, the long-format CSV
    code, table, _ = run(capsys, "--url", url, "results", job_id)
    assert code == 0 and table == out
    code, out, _ = run(capsys, "results", job_id, "--format", "json", "--url", url)  # options after the command too
    results = json.loads(out)
    assert code == 0 and results["job_id"] == job_id and results["complete"] is True
    assert {c["variant"] for c in results["cells"]} == {"bn", "gn(4)"} and results["verdicts"]
    code, out, _ = run(capsys, "--url", url, "results", job_id, "--format", "csv")
    rows_csv = list(csv.reader(io.StringIO(out)))
    assert code == 0
    assert rows_csv[0] == ["job_id", "run_id", "variant", "batch_size", "seed", "step", "epoch", "name", "value"]
    assert len(rows_csv) > 4 and {r[7] for r in rows_csv[1:]} >= {"val_acc", "val_loss", "train_loss"}

    code, out, _ = run(capsys, "--url", url, "status", job_id)
    assert code == 0 and "status    succeeded" in out and "(cli smoke)" in out and "4 succeeded" in out
    assert "variants  bn, gn(groups=4)" in out
    code, out, _ = run(capsys, "--url", url, "status", job_id, "--json")
    assert json.loads(out)["status"] == "succeeded"
    code, out, _ = run(capsys, "--url", url, "jobs", "ls")
    assert code == 0 and job_id in out and "succeeded" in out and "4/4" in out
    code, out, _ = run(capsys, "--url", url, "report", job_id)
    assert code == 0 and out.strip() == f"{url}/v1/jobs/{job_id}/report"
    opened: list[str] = []
    monkeypatch.setattr(cli.webbrowser, "open", lambda u: opened.append(u) or True)
    code, out, _ = run(capsys, "--url", url, "report", job_id, "--open")
    assert code == 0 and opened == [f"{url}/v1/jobs/{job_id}/report"]


@pytest.mark.e2e
def test_upload_then_submit_without_waiting_then_cancel(
    url: str, worker: WorkerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "bars.npz"
    data.write_bytes(image_npz())
    code, out, err = run(
        capsys,
        "--url",
        url,
        "submit",
        str(data),
        "--variants",
        "bn,gn:size=4",
        "--batch-sizes",
        "2",
        "--seeds",
        "0,1",
        "--epochs",
        "40",
        "--arch",
        "cnn",
        "--width",
        "8",
        "--no-wait",
    )
    assert code == 0, err
    assert "uploaded bars.npz as dataset" in err
    job_id = out.strip()
    code, out, err = run(capsys, "--url", url, "cancel", job_id)
    assert code == 0 and "cancel requested" in err
    deadline = time.monotonic() + 30
    while True:
        code, out, _ = run(capsys, "--url", url, "status", job_id, "--json")
        job = json.loads(out)
        if job["status"] == "cancelled" and job["progress"]["runs_finished"] == 4:
            break
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    assert [v["group_size"] for v in job["spec"]["variants"] if v["norm"] == "gn"] == [4]
    code, out, err = run(capsys, "--url", url, "retry", job_id)  # the cancelled runs go back to the queue
    assert code == 0 and "queued again" in err
    code, out, _ = run(capsys, "--url", url, "status", job_id, "--json")
    assert json.loads(out)["progress"]["counts"]["cancelled"] == 0
    run(capsys, "--url", url, "cancel", job_id)  # leave the worker idle for the next test
    # A finished but cancelled job: `results` still prints what there is; submit would exit 1 (below).
    code, out, _ = run(capsys, "--url", url, "results", job_id)
    assert code == 0 and "gn(size=4)" in out


# ------------------------------------------------------------------------------------ datasets


def test_datasets_upload_ls_rm(url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "bars.npz"
    data.write_bytes(image_npz())
    code, out, err = run(capsys, "--url", url, "datasets", "upload", str(data), "--name", "my bars")
    assert code == 0, err
    dataset_id = out.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", dataset_id) and "image 1×8×8, 3 classes, 120 samples" in err
    code, out, _ = run(capsys, "--url", url, "datasets", "ls")
    assert code == 0 and dataset_id in out and "my bars" in out and "digits" in out and "built-in" in out
    assert out.splitlines()[0].split() == ["id", "name", "kind", "shape", "classes", "samples", "size", "created"]
    code, out, _ = run(capsys, "--url", url, "datasets", "ls", "--json")
    assert dataset_id in {d["id"] for d in json.loads(out)}
    code, out, err = run(capsys, "--url", url, "datasets", "rm", dataset_id)
    assert code == 0 and f"deleted dataset {dataset_id}" in err
    code, out, _ = run(capsys, "--url", url, "datasets", "ls")
    assert dataset_id not in out
    code, _, err = run(capsys, "--url", url, "datasets", "rm", dataset_id)
    assert code == 1 and err.startswith("error: ") and "not found" in err


def test_csv_upload_with_label_column(url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    table = tmp_path / "table.csv"
    rows = ["a,b,species"] + [f"{i % 7},{(i * 3) % 5},{'xy'[i % 2]}" for i in range(40)]
    table.write_text("\n".join(rows) + "\n")
    code, out, err = run(capsys, "--url", url, "datasets", "upload", str(table), "--label-column", "species")
    assert code == 0, err
    assert "tabular 2, 2 classes, 40 samples" in err
    code, _, err = run(capsys, "--url", url, "datasets", "upload", str(table))  # no `label` column
    assert code == 1 and err.startswith("error: ") and "label" in err


# -------------------------------------------------------------------------------------- errors


def test_unknown_job_is_exit_1_with_the_api_detail(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status", "nope"], ["results", "nope"], ["results", "nope", "--format", "csv"], ["report", "nope"]):
        code, out, err = run(capsys, "--url", url, *argv)
        assert code == 1, argv
        assert err == "error: job 'nope' not found; GET /v1/jobs lists your jobs\n", argv
        assert out == ""


def test_invalid_spec_is_exit_1_with_the_api_detail(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "--url", url, "submit", "digits", "--variants", "bn,zz", "--batch-sizes", "8", "--arch", "mlp"
    )
    assert code == 1 and err.startswith("error: ") and "unknown norm 'zz'" in err
    code, _, err = run(
        capsys, "--url", url, "submit", "digits", "--variants", "gn:7", "--batch-sizes", "8", "--arch", "mlp"
    )
    assert code == 1 and "groups" in err and "256" in err  # 7 does not divide the MLP's 256 channels


@pytest.mark.parametrize(
    "variants, message",
    [
        ("gn:abc", "'abc' is not a number"),
        ("GN", "starts with a norm name"),
        ("gn:", "nothing after ':'"),
        ("brn:r_max=1/2", "only groups and group_size can be swept"),
        ("gn:4:groups=8", "groups is given twice"),
        (",", "no variant given"),
    ],
)
def test_bad_variant_syntax_is_exit_2_listing_the_forms(
    variants: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["submit", "digits", "--variants", variants, "--batch-sizes", "8"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --variants" in err and message in err
    assert "variant forms" in err and "gn:8/16/32" in err and "gn:size=8" in err


def test_bad_lists_are_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--batch-sizes", "2,x"], "comma-separated list of integers"),
        (["--batch-sizes", "8", "--seeds", "0"], "at least 1"),
        (["--batch-sizes", "8", "--seeds", "many"], "neither a number of seeds"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(["submit", "digits", "--variants", "bn", *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_unreachable_server_and_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    code, _, err = run(capsys, "--url", f"http://127.0.0.1:{port}", "jobs", "ls")
    assert code == 1 and "cannot reach the NormBench server" in err and "NORMBENCH_URL" in err
    code, _, err = run(capsys, "submit", str(tmp_path / "gone.npz"), "--variants", "bn", "--batch-sizes", "8")
    assert code == 1 and "no such file" in err


def test_key_and_url_from_the_environment(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed = settings.model_copy(update={"require_api_keys": True})
    with session_factory(keyed.resolved_database_url)() as s:
        token = keys.create_key(s, "carol").token
    for base in serve(keyed):
        monkeypatch.setenv("NORMBENCH_URL", base)
        monkeypatch.delenv("NORMBENCH_API_KEY", raising=False)
        code, _, err = run(capsys, "jobs", "ls")
        assert code == 1 and err.startswith("error: ") and "API key" in err
        monkeypatch.setenv("NORMBENCH_API_KEY", token)
        code, out, err = run(capsys, "datasets", "ls")
        assert code == 0 and "digits" in out, err
        code, _, err = run(capsys, "--api-key", "nb_bad_key", "jobs", "ls")  # the flag wins over the environment
        assert code == 1


# ---------------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    "text, variant",
    [
        ("bn", {"norm": "bn"}),
        ("gn:32", {"norm": "gn", "groups": 32}),
        ("gn:size=8", {"norm": "gn", "group_size": 8}),
        ("gn:8/16/32", {"norm": "gn", "groups": [8, 16, 32]}),
        ("gn:size=4/8", {"norm": "gn", "group_size": [4, 8]}),
        ("gn_ws:16", {"norm": "gn_ws", "groups": 16}),
        ("evonorm_s0:8", {"norm": "evonorm_s0", "groups": 8}),
        ("bn_precise:precise_samples=4096", {"norm": "bn_precise", "precise_samples": 4096}),
        ("brn:r_max=2.5:d_max=3", {"norm": "brn", "r_max": 2.5, "d_max": 3}),
        (" ln ", {"norm": "ln"}),
    ],
)
def test_variant_forms(text: str, variant: dict[str, object]) -> None:
    assert cli.parse_variant(text) == variant


def test_variants_and_seeds_arguments() -> None:
    assert cli.variants_arg("bn,gn:32,ln,in,bn_precise,brn,frn,none") == [
        {"norm": n} if n != "gn" else {"norm": "gn", "groups": 32}
        for n in ("bn", "gn", "ln", "in", "bn_precise", "brn", "frn", "none")
    ]
    assert cli.seeds_arg("3") == [0, 1, 2] and cli.seeds_arg("0,5,7") == [0, 5, 7]


def test_failed_or_cancelled_job_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    job = {"id": "j1", "status": "failed", "progress": {"counts": {"succeeded": 3, "failed": 1, "queued": 0}}}
    runs = [{"status": "failed", "error": "ValueError: bad data"}]
    assert cli.job_outcome(job, {"runs": runs}) == 1
    assert capsys.readouterr().err == "error: job j1 failed: 3 succeeded, 1 failed; first error: ValueError: bad data\n"
    assert cli.job_outcome({**job, "status": "succeeded"}, {"runs": []}) == 0


def test_the_cli_imports_no_service_code() -> None:
    code = "import sys, app.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('app', 'sqlalchemy', 'fastapi', 'torch')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout.replace("'", '"'))
    # The torch-free core (run states, the byte formatter) is plain Python the CLI may share; nothing else.
    assert [m for m in imported if m != "app.core" and not m.startswith("app.core.")] == ["app", "app.cli"]
    proc = subprocess.run([sys.executable, "-m", "app.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "submit" in proc.stdout and "variant forms" in proc.stdout
