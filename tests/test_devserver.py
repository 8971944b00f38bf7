"""`make run` as a new user meets it: quiet output, the demo reused, and SIGTERM / Ctrl-C stop everything.

The process tests start the real devserver (API + worker child processes on SQLite) in a temporary home.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app import cli, devserver
from app.schemas.jobs import JobSpec
from tests.support import ROOT, worker_env

# What the user did not cause has no place in `make run`'s output.
UNASKED = re.compile(r"warning|traceback|^error|\berror:|deprecat|No hostname was supplied", re.IGNORECASE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (zombies excluded), from /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            out.add(pid)
    return out


class Launched:
    """A command started in a session of its own, its output collected line by line."""

    def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} before {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout:.0f}s:\n{self.output}"
            time.sleep(0.2)

    def finish(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


Launch = Callable[[list[str]], Launched]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Starts commands in a temporary NORMBENCH_HOME (e2e: real API and worker processes); kills leftovers."""
    started: list[tuple[Launched, set[int]]] = []

    def start(cmd: list[str]) -> Launched:
        launched = Launched(cmd, worker_env(NORMBENCH_HOME=str(tmp_path / "home")))
        started.append((launched, set()))
        return launched

    yield start
    for launched, _ in started:  # a failed test leaves nothing running
        kids = descendants(launched.proc.pid)
        launched.kill()
        for pid in alive(kids):
            os.kill(pid, signal.SIGKILL)


def devserver_cmd(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "app.devserver", "--port", str(port), *extra]


# ------------------------------------------------------------------------------- stopping cleanly


@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_stops_api_and_worker_and_exits_0(launch: Launch, sig: signal.Signals) -> None:
    port = free_port()
    server = launch(devserver_cmd(port, "--no-demo"))
    server.wait_for("serving; press Ctrl-C to stop")
    children = descendants(server.proc.pid)
    assert len(children) >= 2, children  # the worker and the API
    assert not port_is_free(port)
    if sig == signal.SIGINT:
        os.killpg(server.proc.pid, sig)  # a terminal's Ctrl-C signals the whole foreground process group
    else:
        server.proc.send_signal(sig)  # `kill PID`
    assert server.finish() == 0, server.output
    assert server.output.rstrip().endswith("stopped"), server.output
    assert not alive(children), f"left running: {alive(children)}\n{server.output}"
    assert port_is_free(port), server.output
    assert not UNASKED.search(server.output), server.output


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_killing_the_devserver_outright_takes_its_children_down(launch: Launch) -> None:
    port = free_port()
    server = launch(devserver_cmd(port, "--no-demo"))
    server.wait_for("serving; press Ctrl-C to stop")
    children = descendants(server.proc.pid)
    server.proc.send_signal(signal.SIGKILL)  # no chance to clean up
    server.finish()
    deadline = time.monotonic() + 60
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(children)
    assert port_is_free(port)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_make_run_stops_everything_without_an_error(launch: Launch, sig: signal.Signals) -> None:
    port = free_port()
    stamp = f"{sys.prefix}/bin/.installed"  # `-o`: never (re)install in a test
    make = launch(["make", "-s", f"VENV={sys.prefix}", "-o", stamp, "run", f"RUN_ARGS=--no-demo --port {port}"])
    make.wait_for("serving; press Ctrl-C to stop")
    everything = descendants(make.proc.pid)
    if sig == signal.SIGINT:
        os.killpg(make.proc.pid, sig)
    else:
        make.proc.send_signal(sig)  # make passes SIGTERM on to the devserver
    # make reports the signal it got as its own exit status (it re-raises it); the recipe itself ended with 0,
    # so make prints no "*** [run] Error" line.
    assert make.finish() == -sig, make.output
    assert make.output.rstrip().endswith("stopped"), make.output
    assert "***" not in make.output and not UNASKED.search(make.output), make.output
    assert not alive(everything)
    assert port_is_free(port)


# ------------------------------------------------------------------------- the demo, twice


@pytest.mark.e2e
def test_the_demo_prints_nothing_unasked_and_a_second_start_reuses_it(launch: Launch) -> None:
    port = free_port()
    first = launch(devserver_cmd(port, "--exit-after-demo", "--epochs", "1", "--seeds", "1"))
    assert first.finish(timeout=900) == 0, first.output
    out = first.output
    assert not UNASKED.search(out), out
    assert "finished in" in out and "status succeeded" in out, out
    assert "% of steps" in out and "mean ± half-width of the 95% t-interval" in out, out
    assert ".venv/bin/normbench submit digits --arch mlp" in out or "normbench submit digits --arch mlp" in out
    job_id = re.search(r"demo job ([0-9a-f]{32})", out).group(1)  # type: ignore[union-attr]

    second = launch(devserver_cmd(port, "--exit-after-demo", "--epochs", "1", "--seeds", "1"))
    assert second.finish(timeout=300) == 0, second.output
    assert f"demo job {job_id}: submitted by an earlier start" in second.output, second.output
    assert "status succeeded" in second.output and not UNASKED.search(second.output)


# ------------------------------------------------------------------------------------- pure parts


def test_the_demo_is_what_its_printed_cli_command_submits() -> None:
    """`make run` prints the demo as a `normbench submit` command: both give the same job spec."""
    args = cli.build_parser().parse_args(devserver.demo_cli_args(10, 3))
    assert args.arch == "mlp"
    from_cli = JobSpec.model_validate(cli.submit_spec(args, args.dataset))
    assert from_cli == JobSpec.model_validate(devserver.demo_spec(10, 3))


def test_cli_arch_default_is_auto_and_documented() -> None:
    """The choice: `submit` keeps `auto` (right for a user's images), the demo passes mlp; both say so."""
    args = cli.build_parser().parse_args(["submit", "digits", "--variants", "bn", "--batch-sizes", "2"])
    assert args.arch == "auto"
    readme = (ROOT / "README.md").read_text()
    assert "--arch auto" in readme and "--arch mlp" in readme


def test_spec_contains_matches_the_api_form_of_the_demo_spec() -> None:
    spec = devserver.demo_spec(10, 3)
    served = JobSpec.model_validate(spec).model_dump(mode="json")  # defaults filled in, as the API returns it
    assert devserver.spec_contains(served, spec)
    assert not devserver.spec_contains(served, devserver.demo_spec(10, 2))
    assert not devserver.spec_contains(served, devserver.demo_spec(5, 3))


def test_child_messages_clear_and_redraw_the_progress_line() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    console = devserver.Console(out)
    console.progress("[##--] 50.0%", key=1)
    console.say("a worker message")
    assert out.getvalue() == "\r[##--] 50.0%" + "\r" + " " * 12 + "\r" + "a worker message\n" + "[##--] 50.0%"


def test_off_a_terminal_progress_is_one_line_per_change() -> None:
    out = io.StringIO()
    console = devserver.Console(out)
    for key in (1, 1, 1, 2):
        console.progress(f"line {key}", key)
    assert out.getvalue() == "line 1\nline 2\n"


def test_shutdown_chatter_is_filtered_and_real_messages_are_not() -> None:
    noise = ["worker: Warm shutdown (MainProcess)", "[x: WARNING/MainProcess] shutdown requested: checkpointing "
             "the current run and handing it back"]  # fmt: skip
    assert all(any(p.search(line) for p in devserver.NOISE) for line in noise)
    assert not any(p.search("[x: ERROR/MainProcess] run 1 failed: out of memory") for p in devserver.NOISE)


def test_progress_line_says_what_the_bar_and_the_counter_count() -> None:
    """The bar is training steps, the counter finished runs: a pack of 6 at half way is 50% with 0/18 runs."""
    job = {
        "status": "running",
        "progress": {"fraction": 0.5, "runs_finished": 0, "runs_total": 18, "counts": {"running": 6, "queued": 12}},
    }
    line = cli.progress_line(job)
    assert "50.0% of steps" in line and "runs 0/18 (6 training)" in line
