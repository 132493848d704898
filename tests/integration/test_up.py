"""``tickwire up``: its workers never outlive it, and a port already in use is refused."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.migrate import migrate
from infra.stack import REPO, pid_alive
from tests.waiting import eventually
from workers.cli import WORKERS
from workers.demo import scrape
from workers.up import Child, Launcher, LaunchError

pytestmark = pytest.mark.integration

SCHEDULER_INDEX = list(WORKERS).index("scheduler")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def up_with_a_scheduler(pg_dsn: str, log_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``tickwire up --workers scheduler`` until it says it is healthy: it and its worker's
    pid. Whatever is left of either is killed at the end."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKWIRE_")} | {
        "TICKWIRE_POSTGRES_DSN": pg_dsn,
        "TICKWIRE_TRAIN_SCHEDULE": "demo/EURUSD/M5@0 3 1 1 *",
    }
    launcher = subprocess.Popen(
        [
            *(sys.executable, "-m", "workers.cli", "up", "--workers", "scheduler"),
            *("--base-port", str(port - SCHEDULER_INDEX), "--log-dir", str(log_dir)),
        ],
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = 0
    try:
        assert launcher.stdout is not None
        lines = []
        for line in launcher.stdout:
            lines.append(line)
            if line.split()[:1] == ["scheduler"]:
                worker = int(line.split()[2])
                break
        assert worker, f"no worker started: {lines}"
        yield launcher, worker
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
        if worker and pid_alive(worker):
            os.kill(worker, signal.SIGKILL)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGKILL])
async def test_workers_do_not_outlive_their_launcher(
    pg_dsn: str, tmp_path: Path, signum: signal.Signals
) -> None:
    """SIGHUP (the terminal closed) stops the workers as Ctrl-C does; SIGKILL of the
    launcher, which runs no code of its own, still ends them."""
    await migrate(pg_dsn)
    with up_with_a_scheduler(pg_dsn, tmp_path) as (launcher, worker):
        assert pid_alive(worker)
        launcher.send_signal(signum)
        await eventually(lambda: launcher.poll() is not None, timeout=60, what="launcher exit")
        await eventually(lambda: not pid_alive(worker), timeout=60, what="the worker to end")


async def test_workers_started_before_one_that_cannot_start_are_stopped(
    pg_dsn: str, tmp_path: Path
) -> None:
    """The second worker's log cannot be opened: the first, already running, is stopped
    as the launcher gives up, not left behind."""
    await migrate(pg_dsn)
    (tmp_path / "candle-ingest.log").mkdir()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_POSTGRES_DSN": pg_dsn,
        "TICKWIRE_TRAIN_SCHEDULE": "demo/EURUSD/M5@0 3 1 1 *",
    }
    ports = {"scheduler": _free_port(), "candle-ingest": _free_port()}
    launcher = Launcher(["scheduler", "candle-ingest"], log_dir=tmp_path, ports=ports, env=env)
    try:
        with pytest.raises(IsADirectoryError), launcher:
            pass
        scheduler = launcher.children["scheduler"]
        assert scheduler.process.poll() is not None, "the scheduler was left running"
    finally:
        for c in launcher.children.values():
            if c.process.poll() is None:
                c.process.kill()
                c.process.wait()


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"# ok\n")  # a comment in the metrics text format

    def log_message(self, format: str, *args: object) -> None:
        pass


def _start_healthy(launcher: Launcher) -> None:
    launcher.start()
    launcher.wait_healthy(30)


def test_a_metrics_port_in_use_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    """Something (such as a worker a previous run left) answers 200 on the port: the new
    worker could not listen there, and its /healthz must not be taken from the other."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    port = int(server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    launcher = Launcher(["scheduler"], log_dir=tmp_path, ports={"scheduler": port}, env={})
    try:
        with pytest.raises(LaunchError, match=f"port {port} .*in use"):
            _start_healthy(launcher)
        assert launcher.children == {}
    finally:
        launcher.stop()
        server.shutdown()
        server.server_close()


def test_local_health_and_metrics_are_read_directly_whatever_the_proxy_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy for the user's web traffic (http_proxy, without no_proxy) must not stand
    between the launcher and its workers' loopback ports."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    port = int(server.server_address[1])
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    try:
        child = Child("scheduler", port, tmp_path / "log", None)  # type: ignore[arg-type]
        assert child.healthy()
        assert scrape(child.metrics_url) == {}  # no samples, but read
    finally:
        server.shutdown()
        server.server_close()
