"""`make run`: the embedded-default service (SQLite, filesystem broker, local workers) plus the demo.

Migrates the database, starts the API and the workers (one per core on a CPU) as child processes, runs the
built-in demo comparison over HTTP (or shows the one an earlier start already trained), prints its table and
verdicts, then serves until Ctrl-C or SIGTERM, which stop the children and exit 0.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx
from alembic import command
from alembic.config import Config

from app import cli
from app.config import TRAIN_QUEUE, UnsafeBind, check_bind_safety, get_settings

ROOT = Path(__file__).resolve().parent.parent
DEMO_NAME = "demo: BatchNorm vs GroupNorm on digits (MLP)"
# The worker checkpoints its run on SIGTERM before it exits; the API needs a moment to close connections.
WORKER_GRACE_S = 60.0
API_GRACE_S = 15.0

# Lines from the children that tell the user nothing they did not cause: Celery announcing the shutdown we
# asked for, and the worker's note that it checkpoints on that shutdown (the devserver says it once itself).
NOISE = (
    re.compile(r"^worker: (Warm|Cold) shutdown \(MainProcess\)\s*$"),
    re.compile(r"shutdown requested: checkpointing the current run and handing it back\s*$"),
)
# Celery warns about root even though this worker takes JSON only (pickle is what makes root dangerous, and
# Celery refuses that outright): in a container or a root shell the 7-line warning is noise the user did not
# cause. Matched by the start of the message (`-W` syntax); every other warning still shows.
WORKER_WARNING_FILTERS = ("ignore:You're running the worker with superuser privileges",)


class Stop(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM: stop the children and exit 0. A BaseException, like
    KeyboardInterrupt, so no `except Exception` on the way swallows it."""


def demo_spec(epochs: int, seeds: int) -> dict[str, object]:
    # The MLP view of digits: BN normalizes 256 features over the batch, which at batch 2 is two
    # values per feature, so its statistics are noise; GN's per-sample statistics are not. (The CNN
    # that `--arch auto` picks for images saturates near 99.5% for every norm on these 8×8 digits.)
    return {
        "dataset_id": "digits",
        "name": DEMO_NAME,
        "model": {"arch": "mlp", "hidden": [256, 256]},
        "variants": [{"norm": "bn"}, {"norm": "gn", "groups": 16}],
        "batch_sizes": [2, 8, 32],
        "seeds": list(range(seeds)),
        "budget": {"epochs": epochs},
        "optimizer": {"lr": 0.1, "reference_batch_size": 32, "lr_scaling": "linear", "warmup_epochs": 1},
        "validation_fraction": 0.2,
    }


def demo_cli_args(epochs: int, seeds: int) -> list[str]:
    """The same comparison as `normbench submit` arguments (tests check both give one spec)."""
    return ["submit", "digits", "--arch", "mlp", "--variants", "bn,gn:16", "--batch-sizes", "2,8,32",
            "--seeds", str(seeds), "--epochs", str(epochs), "--validation-fraction", "0.2", "--name", DEMO_NAME]  # fmt: skip


def normbench_command() -> str:
    """How to call the CLI from here: `.venv/bin/normbench` (it is not on PATH unless the venv is active)."""
    script = Path(sys.executable).parent / "normbench"
    if not script.exists():
        return "normbench"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def migrate(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def worker_command(loglevel: str, *extra: str, quiet: bool = False) -> list[str]:
    """One local worker on the train queue; solo pool, so SIGTERM reaches the training loop. `quiet`
    drops Celery's start-up banner (logging is unaffected)."""
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", *(["--quiet"] if quiet else []),
            "worker", "-Q", TRAIN_QUEUE, "--pool", "solo", "--loglevel", loglevel, *extra]  # fmt: skip


# Idle keep-alive connections stay open longer than clients keep theirs (httpx 5 s, browsers and proxies
# up to 60 s): with uvicorn's default 5 s, a loaded server closes a connection just as the client reuses it,
# and the client sees a dropped request (tests/test_load.py's flood found it). Dockerfile and compose match.
KEEP_ALIVE_SECONDS = 75


def api_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port),
            "--timeout-keep-alive", str(KEEP_ALIVE_SECONDS), "--log-level", "warning"]  # fmt: skip


# ------------------------------------------------------------------------------------ child processes


def _child_setup(parent: int) -> Callable[[], None]:
    """Runs in each child between fork and exec: its own process group, so a terminal's Ctrl-C reaches only
    the devserver (which stops the children in order: the worker checkpoints first); and on Linux a SIGTERM
    when the devserver dies without cleaning up (SIGKILL, a crash), so no child outlives it holding the port."""

    def setup() -> None:
        os.setpgid(0, 0)
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the devserver died before prctl took effect
                os._exit(1)

    return setup


class Console:
    """stdout shared by the progress line and the children's messages: a message clears the progress line,
    prints, and draws it again, so the two never run into each other. Off a terminal (a log, a pipe) the
    progress is printed as a new line only when it changes."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.tty = out.isatty()
        self.lock = threading.Lock()
        self.bar = ""
        self.last: object = None

    def say(self, text: str = "") -> None:
        with self.lock:
            if self.bar:
                self.out.write("\r" + " " * len(self.bar) + "\r")
            self.out.write(text + "\n")
            if self.bar:
                self.out.write(self.bar)
            self.out.flush()

    def progress(self, line: str, key: object) -> None:
        with self.lock:
            if self.tty:
                pad = " " * max(0, len(self.bar) - len(line))
                self.out.write("\r" + line + pad)
                self.bar = line
            elif key != self.last:
                self.out.write(line + "\n")
            self.last = key
            self.out.flush()

    def end_progress(self) -> None:
        with self.lock:
            if self.bar:
                self.out.write("\n")
                self.out.flush()
            self.bar = ""
            self.last = None


def relay(proc: subprocess.Popen[bytes], console: Console) -> threading.Thread:
    """Forward a child's output line by line, leaving out NOISE."""

    def run() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.strip() and not any(p.search(line) for p in NOISE):
                console.say(line)

    thread = threading.Thread(target=run, name=f"relay-{proc.pid}", daemon=True)
    thread.start()
    return thread


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    filters = [f for f in env.get("PYTHONWARNINGS", "").split(",") if f]
    env["PYTHONWARNINGS"] = ",".join([*filters, *WORKER_WARNING_FILTERS])
    return env


def start_children(host: str, port: int, procs: list[subprocess.Popen[bytes]]) -> None:
    """The workers first (NORMBENCH_WORKERS: one per core without a GPU, so packs train side by side), then the
    API, each appended to `procs` as soon as it exists (a stop signal on the way still finds those started)."""
    workers = [
        worker_command("WARNING", "--hostname", f"normbench-local{'' if i == 0 else f'-{i + 1}'}@%h", quiet=True)
        for i in range(get_settings().resolved_workers)
    ]
    for cmd, env in [*((w, worker_env()) for w in workers), (api_command(host, port), None)]:
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup(os.getpid()),  # before the relay threads start (fork with threads is unsafe)
            )
        )


def stop_children(procs: list[subprocess.Popen[bytes]], console: Console, reason: str = "") -> bool:
    """SIGTERM to each, then wait (the worker checkpoints a run it was training); a second Ctrl-C/SIGTERM, or
    the grace time running out, kills what is left."""
    hurry = threading.Event()

    def again(signum: int, frame: FrameType | None) -> None:
        hurry.set()

    signal.signal(signal.SIGINT, again)
    signal.signal(signal.SIGTERM, again)
    live = [p for p in procs if p.poll() is None]
    if not live:
        return False
    console.end_progress()
    console.say(f"{reason}stopping the API and the worker (a run in training is checkpointed and resumes next time)")
    for p in live:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + max(WORKER_GRACE_S, API_GRACE_S)
    while any(p.poll() is None for p in live) and time.monotonic() < deadline and not hurry.is_set():
        time.sleep(0.1)
    for p in live:
        if p.poll() is None:
            p.kill()
            p.wait()
    return True


# ------------------------------------------------------------------------------------------ the demo


def wait_healthy(client: httpx.Client, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_children(procs)
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the API did not answer within {timeout:.0f}s")


def check_children(procs: list[subprocess.Popen[bytes]]) -> None:
    for name, p in zip(["worker"] * (len(procs) - 1) + ["API"], procs, strict=True):
        if p.poll() is not None:
            raise SystemExit(f"the {name} process exited (status {p.returncode}); see its messages above")


def spec_contains(have: Any, want: Any) -> bool:
    """`have` (a job's spec as the API returns it, defaults filled in) holds everything in `want`."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and spec_contains(have[k], v) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(spec_contains(h, w) for h, w in zip(have, want, strict=True))
        )
    return bool(have == want)


def earlier_demo(client: httpx.Client, spec: dict[str, object]) -> dict[str, Any] | None:
    """The newest job with this spec that succeeded or is still going (a failed or cancelled one is trained
    again), so each `make run` does not queue the same demo once more."""
    for job in client.get("/v1/jobs").json()["items"]:
        if job["status"] not in ("failed", "cancelled") and spec_contains(job["spec"], spec):
            return job  # type: ignore[no-any-return]
    return None


def follow_job(client: httpx.Client, job_id: str, console: Console, procs: list[subprocess.Popen[bytes]]) -> Any:
    while True:
        check_children(procs)
        job = client.get(f"/v1/jobs/{job_id}").json()
        p = job["progress"]
        key = (p["runs_finished"], int(p["fraction"] * 10), job["status"], p["counts"].get("running", 0))
        console.progress("  " + cli.progress_line(job), key)
        if p["runs_finished"] == p["runs_total"]:
            console.end_progress()
            return job
        time.sleep(0.5)


def duration(job: dict[str, Any]) -> str:
    """Submission to last run's end, from the job's own timestamps (also right for a job an earlier start ran)."""
    if not job.get("finished_at"):
        return "?"
    seconds = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["created_at"])).total_seconds()
    return f"{seconds:.0f}s"


def run_demo(
    client: httpx.Client, base: str, args: argparse.Namespace, console: Console, procs: list[subprocess.Popen[bytes]]
) -> None:
    spec = demo_spec(args.epochs, args.seeds)
    job = None if args.new_demo else earlier_demo(client, spec)
    if job is None:
        resp = client.post("/v1/jobs", json=spec)
        if resp.status_code != 202:
            raise SystemExit(f"demo submit failed: {resp.status_code} {resp.text}")
        job = resp.json()
        console.say(f"demo job {job['id']}: bn vs gn(16), MLP on digits, batch sizes 2/8/32, {args.seeds} seeds")
    else:
        console.say(
            f"demo job {job['id']}: submitted by an earlier start with the same spec, so it is reused "
            f"({job['status']}; `make run RUN_ARGS=--new-demo` trains it again)"
        )
    console.say(
        "(the same comparison from the command line: "
        f"{normbench_command()} {' '.join(demo_cli_args(args.epochs, args.seeds)[:-2])})"
    )
    job = follow_job(client, job["id"], console, procs)
    results = client.get(f"/v1/jobs/{job['id']}/results").json()
    console.say(f"finished in {duration(job)} with status {job['status']}\n")
    console.say(cli.results_table(results))
    link = f"{base}/v1/jobs/{job['id']}"
    console.say(f"\nreport:  {link}/report\nresults: {link}/results\ncurves:  {link}/curves?metric=val_acc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("NORMBENCH_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("NORMBENCH_PORT", "8000")))
    parser.add_argument("--epochs", type=int, default=10, help="demo epoch budget")
    parser.add_argument("--seeds", type=int, default=3, help="demo seeds per cell (3: enough for a paired test)")
    parser.add_argument("--no-demo", action="store_true", help="only start the service")
    parser.add_argument(
        "--new-demo", action="store_true", help="train the demo again even if an earlier start already did"
    )
    parser.add_argument("--exit-after-demo", action="store_true", help="stop once the demo is printed")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace, console: Console, procs: list[subprocess.Popen[bytes]]) -> None:
    settings = get_settings()
    try:
        check_bind_safety(settings, args.host)
    except UnsafeBind as e:
        raise SystemExit(str(e)) from None
    settings.home.mkdir(parents=True, exist_ok=True)
    console.say(
        f"NormBench (embedded): database {settings.resolved_database_url}, storage {settings.resolved_storage_url}"
    )
    migrate(settings.resolved_database_url)
    start_children(args.host, args.port, procs)
    for p in procs:
        relay(p, console)
    base = f"http://{args.host}:{args.port}"
    with httpx.Client(base_url=base, timeout=30) as client:
        wait_healthy(client, procs)
        console.say(f"API at {base}  (OpenAPI docs: {base}/docs)")
        if not args.no_demo:
            run_demo(client, base, args, console, procs)
        if args.exit_after_demo:
            return
        cmd = normbench_command()
        console.say(
            f"\ncommand line: {cmd} jobs ls  ({cmd} --help lists the commands; after `. .venv/bin/activate` "
            "plain `normbench` works)"
        )
        console.say("serving; press Ctrl-C to stop")
        while True:
            check_children(procs)
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(sys.stdout)
    procs: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    reason = ""
    try:
        serve(args, console, procs)
        return 0
    except Stop as e:
        reason = f"{e}: "
        return 0
    finally:
        if stop_children(procs, console, reason):
            console.say("stopped")


if __name__ == "__main__":
    sys.exit(main())
