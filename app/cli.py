"""`normbench`: the command-line client of a NormBench server (or `python -m app.cli`).

    normbench submit digits --variants bn,gn:16,ln --batch-sizes 2,8,32 --seeds 3 --epochs 10 --arch mlp
    normbench submit my_data.npz --variants bn,gn:8/16/32 --batch-sizes 2,4,8 --seeds 3 --epochs 10
    normbench status JOB · normbench results JOB --format table|json|csv · normbench report JOB [--open]
    normbench datasets ls | upload FILE [--name N] [--label-column C] [--kind signal] | rm ID
    normbench weights ls | upload FILE --arch ARCH [--name N] | rm ID   (pretrained .safetensors state dicts)
    normbench jobs ls | rm JOB · normbench cancel JOB · normbench retry JOB · normbench extend JOB --seeds N

It talks to the server over HTTP only (it imports nothing of the service): the base URL comes from
`--url` or NORMBENCH_URL (default http://127.0.0.1:8000), an API key from `--api-key` or
NORMBENCH_API_KEY (sent as `Authorization: Bearer ...`). Results go to stdout, progress and messages
to stderr. Exit codes: 0 done; 1 an API error (printed as `error: <detail>`), an unreachable server or
a job that failed or was cancelled; 2 a command line that does not parse; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import webbrowser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from app.core.run_states import RunStatus
from app.core.units import human_bytes

DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD_SUFFIXES = (".npz", ".zip", ".csv", ".jsonl")
FINISHED = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)  # the job statuses that are final
SWEEPABLE = ("groups", "group_size")

VARIANT_FORMS = """\
variant forms (comma-separated in --variants):
  NORM                  bn, ln, in, none, bn_precise, brn, frn, gn, gn_ws, evonorm_s0
  NORM:G                number of groups: gn:32, gn_ws:16, evonorm_s0:8
  NORM:G1/G2/...        a sweep of group counts, one variant each: gn:8/16/32
  NORM:size=S[/S2...]   channels per group instead: gn:size=8, gn:size=4/8
  NORM:KEY=VALUE[:...]  any other parameter: bn_precise:precise_samples=4096, brn:r_max=2:d_max=3"""


class CliError(Exception):
    """Printed as `error: <message>`; exit status 1."""


# ----------------------------------------------------------------------------- parsing arguments

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")


def _number(text: str) -> int | float:
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    raise ValueError(text)


def parse_variant(text: str) -> dict[str, Any]:
    """`gn:32` → {"norm": "gn", "groups": 32}; see VARIANT_FORMS. Raises ValueError with the reason."""
    norm, sep, rest = text.strip().partition(":")
    if not _NAME.match(norm):
        raise ValueError(f"'{text}': a variant starts with a norm name such as bn or gn")
    variant: dict[str, Any] = {"norm": norm}
    if not sep:
        return variant
    if not rest:
        raise ValueError(f"'{text}': nothing after ':'")
    for part in rest.split(":"):
        key, eq, value = part.partition("=")
        if not eq:
            key, value = "groups", part
        key = {"size": "group_size"}.get(key, key)
        if not _NAME.match(key):
            raise ValueError(f"'{text}': '{key}' is not a parameter name")
        if key in variant:
            raise ValueError(f"'{text}': {key} is given twice")
        try:
            values = [_number(v) for v in value.split("/")]
        except ValueError as e:
            raise ValueError(f"'{text}': '{e}' is not a number") from None
        if len(values) > 1 and key not in SWEEPABLE:
            raise ValueError(f"'{text}': only groups and group_size can be swept with '/'")
        variant[key] = values if len(values) > 1 else values[0]
    return variant


def variants_arg(text: str) -> list[dict[str, Any]]:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"no variant given\n{VARIANT_FORMS}")
    try:
        return [parse_variant(t) for t in items]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}\n{VARIANT_FORMS}") from None


def batch_sizes_arg(text: str) -> list[int] | str:
    """`2,4,8`, or `auto`: the powers of two from 2 up to what a probe (`normbench probe`) found fits."""
    return "auto" if text.strip().lower() == "auto" else int_list_arg(text)


def int_list_arg(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers, e.g. 2,4,8") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value, e.g. 2,4,8")
    return values


def seeds_arg(text: str) -> list[int]:
    """`3` → seeds 0, 1, 2; `0,5,7` → those seeds."""
    if "," not in text:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is neither a number of seeds nor a list like 0,1,2") from None
        if n < 1:
            raise argparse.ArgumentTypeError("the number of seeds must be at least 1")
        return list(range(n))
    return int_list_arg(text)


# ----------------------------------------------------------------------------------- HTTP client


class Api:
    """The server's HTTP API; every failure becomes a CliError with the server's `detail`."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"User-Agent": "normbench-cli"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def _check(self, resp: httpx.Response) -> httpx.Response:
        if resp.status_code < 400:
            return resp
        resp.read()
        try:
            body = resp.json()
            detail = body["detail"] if isinstance(body, dict) and "detail" in body else resp.text
        except ValueError:
            detail = resp.text.strip()[:500] or resp.reason_phrase
        if not isinstance(detail, str):
            detail = json.dumps(detail)
        raise CliError(detail if detail else f"HTTP {resp.status_code}")

    def _unreachable(self, e: httpx.HTTPError) -> CliError:
        return CliError(
            f"cannot reach the NormBench server at {self.base_url} ({type(e).__name__}: {e}); "
            "start it or point --url / NORMBENCH_URL at it"
        )

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._check(self.client.request(method, path, **kwargs))
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def stream_to(self, path: str, out: Any) -> None:
        try:
            with self.client.stream("GET", path) as resp:
                self._check(resp)
                for chunk in resp.iter_text():
                    out.write(chunk)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None

    def upload(
        self,
        path: Path,
        name: str | None,
        label_column: str | None,
        kind: str | None = None,
        text: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if not path.is_file():
            raise CliError(f"no such file: {path}")
        if path.suffix.lower() not in UPLOAD_SUFFIXES:
            raise CliError(f"{path}: upload a .npz, a .zip of class folders, a .csv, or texts as .jsonl")
        form = {k: v for k, v in (("name", name), ("label_column", label_column), ("kind", kind)) if v}
        form |= {k: str(v) for k, v in (text or {}).items() if v is not None}  # text_column, max_length
        return self._post_file("/v1/datasets", path, form)

    def upload_weights(self, path: Path, arch: str, name: str | None) -> dict[str, Any]:
        if not path.is_file():
            raise CliError(f"no such file: {path}")
        return self._post_file("/v1/weights", path, {"arch": arch, **({"name": name} if name else {})})

    def _post_file(self, url: str, path: Path, form: dict[str, str]) -> dict[str, Any]:
        """POST the file as the multipart `file` field with `form`, streamed from disk (weights reach ~100 MB)."""
        with path.open("rb") as f:
            return self.json(  # type: ignore[no-any-return]
                "POST",
                url,
                files={"file": (path.name, f)},
                data=form,
                timeout=httpx.Timeout(30.0, read=600.0, write=600.0),
            )


# --------------------------------------------------------------------------------------- output


def err(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def progress_line(job: dict[str, Any], width: int = 30) -> str:
    """The bar counts training steps and the counter counts finished runs: runs of a pack train side by side
    and all finish at its end, so the bar can stand at 50% with no run finished; the line says so."""
    p = job["progress"]
    fraction = min(max(float(p["fraction"]), 0.0), 1.0)
    filled = int(round(fraction * width))
    bar = "#" * filled + "-" * (width - filled)
    training = int((p.get("counts") or {}).get(RunStatus.RUNNING, 0))
    runs = f"runs {p['runs_finished']}/{p['runs_total']}" + (f" ({training} training)" if training else "")
    return f"[{bar}] {fraction * 100:5.1f}% of steps  {runs}  {job['status']}"


def cell_text(cell: dict[str, Any] | None) -> str:
    """`mean ± h` (h: half-width of the 95% interval), `mean (low–high)` when the interval was clipped to
    0–100%, `mean (no spread)` when every seed gave the same value (no interval can be formed)."""
    if cell is None:
        return "—"
    acc = cell["val_acc"]
    if acc.get("mean") is None:
        if cell.get("pending"):
            return "pending"
        return "diverged" if cell.get("diverged") else "—"
    text = f"{acc['mean'] * 100:.1f}"
    low, high, half = acc.get("ci95_low"), acc.get("ci95_high"), acc.get("ci95_half_width")
    if acc.get("ci95_clipped") and low is not None and high is not None:
        text += f" ({low * 100:.1f}–{high * 100:.1f})"
    elif half is not None:
        text += f" ± {half * 100:.1f}"
    elif low is not None and high is not None:  # a server without `ci95_half_width`
        text += f" ± {(high - low) / 2 * 100:.1f}"
    elif acc.get("n", 0) >= 2 and acc.get("std") == 0:
        text += " (no spread)"
    if cell["n"] < cell["n_total"]:
        text += f" ({cell['n']}/{cell['n_total']})"
    return text


def results_table(results: dict[str, Any]) -> str:
    """The per-cell table, its footnotes, the verdicts and the "how to read this" text."""
    cells = {(c["variant"], c["batch_size"]): c for c in results["cells"]}
    seeds = max((c["n_total"] for c in results["cells"]), default=0)
    texts = {k: cell_text(c) for k, c in cells.items()}
    first = max([len("variant"), *(len(v) for v in results["variants"])]) + 2
    col = max([len("batch 99999"), *(len(t) for t in texts.values())]) + 2
    header = f"{'variant':<{first}}" + "".join(f"{'batch ' + str(b):>{col}}" for b in results["batch_sizes"])
    lines = [
        f"final validation {'mean IoU' if results.get('metric') == 'val_miou' else 'accuracy'} (%), mean ± half-width "
        f"of the 95% t-interval over {seeds} seed(s)",
        header,
        "-" * len(header),
    ]
    for v in results["variants"]:
        lines.append(f"{v:<{first}}" + "".join(f"{texts.get((v, b), '—'):>{col}}" for b in results["batch_sizes"]))
    accs = [c["val_acc"] for c in results["cells"]]
    footnotes = []
    if any(a.get("ci95_clipped") for a in accs):
        footnotes.append("(low–high): the 95% interval, clipped to 0–100% (accuracy cannot leave that range)")
    if any("(no spread)" in t for t in texts.values()):
        footnotes.append(
            "(no spread): every seed gave the same value; the spread is zero and no interval can be formed"
        )
    if any(c["n"] < c["n_total"] for c in results["cells"]):
        footnotes.append("(n/N): only n of N seeds have a final result (the rest diverged, failed or are pending)")
    if any(c.get("diverged") for c in results["cells"]):
        bad = [f"{c['variant']} at batch {c['batch_size']}: {c['diverged']}" for c in results["cells"] if c["diverged"]]
        footnotes.append("diverged seeds — " + ", ".join(bad))
    lines += footnotes
    for note in results.get("notes") or []:
        lines.append(f"note: {note}")
    verdicts = results.get("verdicts") or []
    if verdicts:
        lines += ["", "verdicts:"] + [f"  - {v}" for v in verdicts]
    how = results.get("how_to_read") or []
    if how:
        lines += ["", "how to read this:"] + [f"  {line}" for line in how]
    return "\n".join(lines)


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# ------------------------------------------------------------------------------------- commands


def wait_for(api: Api, job_id: str, interval: float) -> dict[str, Any]:
    """Poll the job, drawing a progress bar on stderr, until every run has ended."""
    tty = sys.stderr.isatty()
    last = None
    while True:
        job = api.json("GET", f"/v1/jobs/{job_id}")
        line = progress_line(job)
        if tty:
            print(f"\r{line}", end="", file=sys.stderr, flush=True)
        else:
            # Not a terminal (a log, a pipe): a new line only when something visible changed.
            key = (job["progress"]["runs_finished"], int(job["progress"]["fraction"] * 10), job["status"])
            if key != last:
                err(line)
                last = key
        if job["status"] in FINISHED and job["progress"]["runs_finished"] == job["progress"]["runs_total"]:
            if tty:
                print(file=sys.stderr)
            return job  # type: ignore[no-any-return]
        time.sleep(interval)


def job_outcome(job: dict[str, Any], results: dict[str, Any]) -> int:
    if job["status"] == RunStatus.SUCCEEDED:
        return 0
    counts = job["progress"]["counts"]
    errors = [r["error"] for r in results.get("runs", []) if r.get("status") == RunStatus.FAILED and r.get("error")]
    reason = f"; first error: {errors[0]}" if errors else ""
    err(f"error: job {job['id']} {job['status']}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + reason)
    return 1


def submit_spec(args: argparse.Namespace, dataset_id: str) -> dict[str, Any]:
    """The job spec `normbench submit` sends; what it leaves out takes the server's defaults."""
    model: dict[str, Any] = {"arch": args.arch}
    for key in ("depth", "width", "layers", "heads"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    if args.hidden is not None:
        model["hidden"] = args.hidden
    spec: dict[str, Any] = {
        "dataset_id": dataset_id,
        "model": model,
        "variants": args.variants,
        "batch_sizes": args.batch_sizes,
        "seeds": args.seeds,
        "budget": {"epochs": args.epochs},
    }
    if args.name:
        spec["name"] = args.name
    if args.lr is not None:
        spec["optimizer"] = {"lr": args.lr}
    if args.validation_fraction is not None:
        spec["validation_fraction"] = args.validation_fraction
    return spec


_JOB_ID = re.compile(r"[0-9a-f]{32}\Z")
_HEX = re.compile(r"[0-9a-f]+\Z")


def resolve_job(api: Api, ref: str) -> str:
    """A job id from its first characters (as `jobs ls` and git do): the one of the caller's jobs it starts.
    A full id, or a reference that is not hex, is sent as given (the server's 404 explains a wrong one)."""
    if not _HEX.match(ref.lower()):
        return ref
    ref = ref.lower()
    if _JOB_ID.match(ref):
        return ref
    items = api.json("GET", "/v1/jobs")["items"]
    matches = [j["id"] for j in items if j["id"].startswith(ref)]
    if len(matches) > 1:
        raise CliError(
            f"'{ref}' is the start of {len(matches)} of your jobs ({', '.join(m[: len(ref) + 4] for m in matches[:5])}"
            f"{', ...' if len(matches) > 5 else ''}); give more characters"
        )
    return matches[0] if matches else ref


def cmd_submit(api: Api, args: argparse.Namespace) -> int:
    source = args.dataset
    path = Path(source)
    if path.is_file():
        dataset = api.upload(path, args.dataset_name, args.label_column, args.kind, text_form(args))
        err(f"uploaded {path.name} as dataset {dataset['id']} ({dataset['kind']}, {dataset['num_samples']} samples)")
        dataset_id = dataset["id"]
    elif path.suffix.lower() in UPLOAD_SUFFIXES or os.sep in source:
        raise CliError(f"no such file: {source} (give a .npz/.zip/.csv path, or a dataset id such as digits)")
    else:
        dataset_id = source
    job = api.json("POST", "/v1/jobs", json=submit_spec(args, dataset_id))
    total = job["progress"]["runs_total"]
    err(f"submitted job {job['id']}: {total} runs on {dataset_id}")
    if args.no_wait:
        print(job["id"])
        return 0
    try:
        job = wait_for(api, job["id"], args.poll_interval)
    except KeyboardInterrupt:
        err(f"\ninterrupted; the job keeps running: normbench status {job['id']} / normbench cancel {job['id']}")
        return 130
    results = api.json("GET", f"/v1/jobs/{job['id']}/results")
    print(results_table(results))
    return job_outcome(job, results)


def cmd_status(api: Api, args: argparse.Namespace) -> int:
    job = api.json("GET", f"/v1/jobs/{args.job}")
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    spec = job["spec"]
    variants = ", ".join(_variant_text(v) for v in spec["variants"])
    counts = ", ".join(f"{n} {s}" for s, n in job["progress"]["counts"].items() if n) or "no runs"
    print(f"job       {job['id']}" + (f"  ({job['name']})" if job.get("name") else ""))
    print(f"status    {job['status']}")
    print(f"progress  {progress_line(job)}")
    print(f"runs      {counts}")
    print(f"dataset   {job['dataset_id']}   model {spec['model']['arch']}   epochs {spec['budget']['epochs']}")
    print(f"variants  {variants}")
    print(f"batches   {', '.join(str(b) for b in spec['batch_sizes'])}   seeds {', '.join(map(str, spec['seeds']))}")
    print(f"created   {job['created_at']}")
    if job.get("started_at"):
        print(f"started   {job['started_at']}")
    if job.get("finished_at"):
        print(f"finished  {job['finished_at']}")
    return 0


def _variant_text(v: dict[str, Any]) -> str:
    params = [f"{k}={v[k]}" for k in v if k != "norm" and v[k] is not None]
    return v["norm"] + (f"({', '.join(params)})" if params else "")


def cmd_results(api: Api, args: argparse.Namespace) -> int:
    if args.format == "csv":
        api.stream_to(f"/v1/jobs/{args.job}/export.csv", sys.stdout)
        sys.stdout.flush()
        return 0
    params = {"baseline": args.baseline} if args.baseline else None
    results = api.json("GET", f"/v1/jobs/{args.job}/results", params=params)
    if args.format == "json":
        print(json.dumps(results, indent=2))
    else:
        print(results_table(results))
    return 0


def cmd_report(api: Api, args: argparse.Namespace) -> int:
    api.json("GET", f"/v1/jobs/{args.job}")  # an unknown job is an error here, not a 404 page in the browser
    url = f"{api.base_url}/v1/jobs/{args.job}/report"
    print(url)
    if args.open and not webbrowser.open(url):
        err("could not open a browser; open the URL above")
    return 0


def print_listing(
    items: list[dict[str, Any]], as_json: bool, header: list[str], row: Callable[[dict[str, Any]], list[str]]
) -> None:
    """A listing (`ls`) as JSON with --json, else as a table of one row per item."""
    if as_json:
        print(json.dumps(items, indent=2))
    else:
        print_table([row(item) for item in items], header)


def created(item: dict[str, Any]) -> str:
    """An item's creation time as `YYYY-MM-DD HH:MM:SS` (UTC)."""
    return str(item["created_at"])[:19].replace("T", " ")


def _dataset_row(d: dict[str, Any]) -> list[str]:
    shape = "×".join(map(str, d["shape"]))
    when = "built-in" if d["builtin"] else created(d)
    counts = [str(d["num_classes"]), str(d["num_samples"]), human_bytes(d["size_bytes"])]
    return [d["id"], d["name"], d["kind"], shape, *counts, when]


def _weights_row(w: dict[str, Any]) -> list[str]:
    norms = "BN statistics" if w["has_bn_stats"] else "GN weights" if w["has_gn_weights"] else "-"
    head = "-" if w["head_classes"] is None else str(w["head_classes"])
    return [w["id"], w["name"], w["arch"], norms, head, "/".join(w["dtypes"]), human_bytes(w["size_bytes"]), created(w)]


def cmd_datasets(api: Api, args: argparse.Namespace) -> int:
    if args.action == "ls":
        header = ["id", "name", "kind", "shape", "classes", "samples", "size", "created"]
        print_listing(api.json("GET", "/v1/datasets")["items"], args.json, header, _dataset_row)
    elif args.action == "upload":
        d = api.upload(Path(args.file), args.name, args.label_column, args.kind, text_form(args))
        print(d["id"])
        err(
            f"uploaded {args.file}: {d['kind']} {'×'.join(map(str, d['shape']))}, {d['num_classes']} classes, "
            f"{d['num_samples']} samples, {human_bytes(d['size_bytes'])}"
        )
    else:
        api.request("DELETE", f"/v1/datasets/{args.id}")
        err(f"deleted dataset {args.id}")
    return 0


def cmd_weights(api: Api, args: argparse.Namespace) -> int:
    if args.action == "ls":
        items: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:  # every page
            page = api.json("GET", "/v1/weights", params={"limit": 200, "offset": offset})
            items += page["items"]
            offset = page["next_offset"]
        header = ["id", "name", "arch", "norms", "head", "dtypes", "size", "created"]
        print_listing(items, args.json, header, _weights_row)
    elif args.action == "upload":
        w = api.upload_weights(Path(args.file), args.arch, args.name)
        print(w["id"])
        norms = "with BatchNorm statistics" if w["has_bn_stats"] else "GroupNorm weights" if w["has_gn_weights"] else ""
        err(
            f"uploaded {args.file}: {w['arch']}, {w['parameter_count']:,} parameters ({'/'.join(w['dtypes'])})"
            f"{', ' + norms if norms else ''}, {human_bytes(w['size_bytes'])}; use it with "
            f'`"init": {{"weights_id": "{w["id"]}"}}` in a job spec'
        )
    else:
        api.request("DELETE", f"/v1/weights/{args.id}")
        err(f"deleted weights {args.id}")
    return 0


def remove_job(api: Api, job_id: str, timeout: float = 300.0) -> None:
    """DELETE the job; while its running runs are still stopping (the server cancelled them and answered 409),
    wait for them and delete again."""
    deadline = time.monotonic() + timeout
    retried = told = False
    while True:
        try:
            api.request("DELETE", f"/v1/jobs/{job_id}")
            return
        except CliError:
            running = api.json("GET", f"/v1/jobs/{job_id}")["progress"]["counts"].get("running", 0)
            if (not running and retried) or time.monotonic() > deadline:
                raise
            if running and not told:
                err(f"job {job_id}: cancelled; waiting for its {running} running run(s) to stop")
                told = True
            retried = True
            time.sleep(1.0)


def cmd_jobs(api: Api, args: argparse.Namespace) -> int:
    if args.action == "rm":
        remove_job(api, args.job)
        err(f"deleted job {args.job} with its runs, metrics and checkpoints")
        return 0
    header = ["id", "status", "done", "runs", "dataset", "created", "name"]
    print_listing(api.json("GET", "/v1/jobs")["items"], args.json, header, _job_row)
    return 0


def _job_row(j: dict[str, Any]) -> list[str]:
    progress = j["progress"]
    done = f"{progress['fraction'] * 100:.0f}%"
    runs = f"{progress['runs_finished']}/{progress['runs_total']}"
    return [j["id"], j["status"], done, runs, j["dataset_id"], created(j), j.get("name") or ""]


def cmd_cancel(api: Api, args: argparse.Namespace) -> int:
    job = api.json("POST", f"/v1/jobs/{args.job}/cancel")
    err(f"cancel requested for job {job['id']}; running runs stop within seconds")
    print(progress_line(job))
    return 0


def cmd_retry(api: Api, args: argparse.Namespace) -> int:
    job = api.json("POST", f"/v1/jobs/{args.job}/retry")
    err(f"failed and cancelled runs of job {job['id']} are queued again; they resume from their checkpoints")
    print(progress_line(job))
    return 0


def extend_body(text: str) -> dict[str, Any]:
    """`2` → two more seeds (the smallest the job lacks); `5,6` → those seeds."""
    if "," in text:
        return {"seeds": int_list_arg(text)}
    try:
        return {"add_seeds": int(text)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a number of seeds nor a list like 3,4") from None


def cmd_extend(api: Api, args: argparse.Namespace) -> int:
    job = api.json("POST", f"/v1/jobs/{args.job}/extend", json=args.seeds)
    seeds = ", ".join(map(str, job["spec"]["seeds"]))
    err(f"job {job['id']} now has seeds {seeds}; the new runs are queued (`normbench status {job['id']}` to follow)")
    print(progress_line(job))
    return 0


# ------------------------------------------------------------------------------------ the parser


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="normbench",
        parents=[common],
        description="Command-line client of a NormBench server: which normalization layer should my network use "
        "at the batch size I can afford?",
        epilog=VARIANT_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_submit(sub, common)
    _add_job_reports(sub, common)
    _add_datasets(sub, common)
    _add_weights(sub, common)
    _add_job_actions(sub, common)
    from app.cli_probe import add_probe_parser  # imports this module: added last

    add_probe_parser(sub, common)
    return parser


Subparsers = argparse._SubParsersAction  # argparse's own type for what add_subparsers returns


def _common_options() -> argparse.ArgumentParser:
    """--url, --api-key and --timeout, accepted before or after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"server base URL (env NORMBENCH_URL; default {DEFAULT_URL})"
    )
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="API key nb_... (env NORMBENCH_API_KEY)")
    common.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for each HTTP answer (default 30)"
    )
    return common


def _add_submit(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    submit = sub.add_parser(
        "submit",
        parents=[common],
        help="upload a dataset if needed, submit a comparison, wait and print the results",
        description="Submit a comparison job: every variant × batch size × seed on one fixed budget. "
        "Waits with a progress bar (stderr), then prints the statistics table and the verdicts (stdout); "
        "exits 1 if the job failed or was cancelled.",
        epilog=VARIANT_FORMS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument("dataset", metavar="DATASET_FILE_OR_NAME", help="a .npz/.zip/.csv to upload, or a dataset id")
    submit.add_argument("--variants", type=variants_arg, required=True, help="e.g. bn,gn:32,ln (forms below)")
    submit.add_argument(
        "--batch-sizes", type=batch_sizes_arg, required=True, help="e.g. 2,4,8, or auto (after `normbench probe`)"
    )
    submit.add_argument("--seeds", type=seeds_arg, default=[0, 1, 2], help="a count (3 = seeds 0,1,2) or a list")
    submit.add_argument("--epochs", type=int, default=10, help="training epochs per run (default 10)")
    submit.add_argument(
        "--arch",
        choices=["auto", "mlp", "cnn", "resnet", "cnn1d", "resnet1d", "transformer"],
        default="auto",
        help="network (default auto: the server picks mlp for tabular data, cnn for images, cnn1d for 1-D signals; "
        "the `make run` demo "
        "passes mlp, where BatchNorm's small-batch failure shows on digits)",
    )
    submit.add_argument("--depth", type=int, help="ResNet depth (6n+2)")
    submit.add_argument("--width", type=int, help="CNN/ResNet first-stage channels")
    submit.add_argument("--hidden", type=int_list_arg, help="MLP hidden widths, e.g. 256,256")
    submit.add_argument("--layers", type=int, help="transformer blocks (default 2)")
    submit.add_argument("--heads", type=int, help="transformer attention heads, dividing --width (default 4)")
    submit.add_argument("--lr", type=float, help="learning rate at the reference batch size 32 (default 0.1)")
    submit.add_argument(
        "--validation-fraction", type=float, help="share of the training split held out for validation (default 0.1)"
    )
    submit.add_argument("--name", help="a label for the job")
    submit.add_argument("--dataset-name", help="name for an uploaded dataset (default: the file name)")
    submit.add_argument("--label-column", help="CSV upload: the column holding labels (default label)")
    submit.add_argument("--kind", choices=KIND_CHOICES, help=KIND_HELP)
    add_text_options(submit)
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    submit.add_argument("--poll-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    submit.set_defaults(func=cmd_submit)


def _job_command(
    sub: Subparsers[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    name: str,
    help: str,
    func: Callable[[Api, argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A subcommand about one job (JOB: its id or a unique prefix); add its own options to what it returns."""
    parser = sub.add_parser(name, parents=[common], help=help)
    parser.add_argument("job", metavar="JOB")
    parser.set_defaults(func=func)
    return parser


def _resource_command(
    sub: Subparsers[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    name: str,
    help: str,
    ls_help: str,
    func: Callable[[Api, argparse.Namespace], int],
) -> Subparsers[argparse.ArgumentParser]:
    """A command with ACTIONs, `ls [--json]` the first of them; add the others to the subparsers it returns."""
    parser = sub.add_parser(name, parents=[common], help=help)
    parser.set_defaults(func=func)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", parents=[common], help=ls_help)
    ls.add_argument("--json", action="store_true", help="as JSON")
    return actions


def _add_job_reports(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """status, results and report: what a submitted job did."""
    status = _job_command(sub, common, "status", "status and progress of a job", cmd_status)
    status.add_argument("--json", action="store_true", help="the job as JSON")

    results = _job_command(sub, common, "results", "statistics and verdicts of a job", cmd_results)
    results.add_argument(
        "--format",
        choices=["table", "json", "csv"],
        default="table",
        help="table: per-cell mean ± 95%% CI and verdicts; json: the whole results document; "
        "csv: every metric point (long format)",
    )
    results.add_argument("--baseline", help="variant to compare with (default bn)")

    report = _job_command(sub, common, "report", "print (or open) the URL of a job's report page", cmd_report)
    report.add_argument("--open", action="store_true", help="open it in a web browser")


def _add_job_actions(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """jobs ls and rm, cancel, retry and extend."""
    jsub = _resource_command(sub, common, "jobs", "list your jobs", "your jobs, newest first", cmd_jobs)
    jrm = jsub.add_parser(
        "rm", parents=[common], help="delete a job with its runs, metrics and checkpoints (cancels it first)"
    )
    jrm.add_argument("job", metavar="JOB")

    _job_command(sub, common, "cancel", "cancel a job's unfinished runs", cmd_cancel)
    _job_command(sub, common, "retry", "queue a finished job's failed and cancelled runs again", cmd_retry)
    extend = _job_command(sub, common, "extend", "add seeds to a job (same budget and contract)", cmd_extend)
    extend.add_argument(
        "--seeds",
        type=extend_body,
        required=True,
        metavar="N|S1,S2",
        help="how many seeds to add (the smallest the job lacks), or a comma-separated list of new seeds",
    )


KIND_CHOICES = ["auto", "image", "tabular", "signal", "text", "segmentation"]
KIND_HELP = (
    "what an upload holds: signal for a .npz of 1-D signals x of shape (N, L) or (N, C, L), text for a .csv of texts "
    "with a label column (a .jsonl is always text) (default auto)"
)


def add_text_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-column", help="text upload (.jsonl, or .csv with --kind text): the texts' column")
    parser.add_argument(
        "--max-length", type=int, help="text upload: UTF-8 bytes kept per text, longer ones cut (default 256)"
    )


def text_form(args: argparse.Namespace) -> dict[str, Any]:
    return {"text_column": args.text_column, "max_length": args.max_length}


def _add_datasets(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    help = "list, upload or delete datasets"
    dsub = _resource_command(sub, common, "datasets", help, "datasets you can use", cmd_datasets)
    up = dsub.add_parser("upload", parents=[common], help="upload a .npz, .zip of class folders, or .csv")
    up.add_argument("file", metavar="FILE")
    up.add_argument("--name", help="display name (default: the file name)")
    up.add_argument("--label-column", help="CSV: the column holding labels (default label)")
    up.add_argument("--kind", choices=KIND_CHOICES, help=KIND_HELP)
    add_text_options(up)
    rm = dsub.add_parser("rm", parents=[common], help="delete a dataset no job uses")
    rm.add_argument("id", metavar="ID")


def _add_weights(sub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    help = "list, upload or delete pretrained weights"
    wsub = _resource_command(sub, common, "weights", help, "your weights, newest first", cmd_weights)
    up = wsub.add_parser(
        "upload",
        parents=[common],
        help="upload a state dict saved with safetensors.torch.save_file (pickles are refused)",
    )
    up.add_argument("file", metavar="FILE", help="a .safetensors file")
    up.add_argument(
        "--arch", required=True, help="its torchvision architecture: resnet18, resnet50, mobilenet_v3_small, ..."
    )
    up.add_argument("--name", help="display name (default: the file name)")
    rm = wsub.add_parser("rm", parents=[common], help="delete weights no job uses")
    rm.add_argument("id", metavar="ID")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = getattr(args, "url", None) or os.environ.get("NORMBENCH_URL") or DEFAULT_URL
    key = getattr(args, "api_key", None) or os.environ.get("NORMBENCH_API_KEY") or None
    timeout = getattr(args, "timeout", None) or 30.0
    if not math.isfinite(timeout) or timeout <= 0:
        timeout = 30.0
    api = Api(url, key, timeout)
    try:
        if getattr(args, "job", None):
            args.job = resolve_job(api, args.job)
        return int(args.func(api, args))
    except CliError as e:
        err(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except BrokenPipeError:  # `normbench results JOB --format csv | head`
        return 0
    finally:
        api.close()


if __name__ == "__main__":
    sys.exit(main())
