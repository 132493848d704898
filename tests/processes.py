"""A worker as its own OS process, as production runs it: for the kill -9 tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

from infra.stack import StackUrls
from tests.waiting import eventually

REPO = Path(__file__).resolve().parents[1]

_spawned: list[subprocess.Popen[bytes]] = []
"""Every process ``spawn`` started in the running test."""


def worker_env(stack: StackUrls, namespace: str, **settings: str) -> dict[str, str]:
    """The environment of a worker in ``namespace`` on the test stack's NATS: pulls that
    expire after 1 s, warnings only, and ``settings`` as ``TICKWIRE_<NAME>``."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(stack.nats_url),
        "TICKWIRE_NAMESPACE": namespace,
        "TICKWIRE_PULL_EXPIRES_S": "1",
        "TICKWIRE_LOG_LEVEL": "WARNING",
    } | {f"TICKWIRE_{name.upper()}": value for name, value in settings.items()}


def spawn(
    worker: str, env: dict[str, str], log: Path, *, module: str = "workers.cli"
) -> subprocess.Popen[bytes]:
    """``tickwire run WORKER`` with ``env``, its output appended to ``log`` (``module``:
    another command line taking ``run WORKER``, such as ``tests.crashing_worker``)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "run", worker],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    _spawned.append(proc)
    return proc


def kill_spawned() -> None:
    """Kill every process ``spawn`` started that still runs (a test failed before it
    stopped them)."""
    for proc in _spawned:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _spawned.clear()


def tail(log: Path, chars: int = 3000) -> str:
    """The end of a worker's log, for the message of a failed assertion."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else f"(no {log})"


def running(proc: subprocess.Popen[bytes], log: Path) -> bool:
    """True while ``proc`` runs; once it has exited, an error with the end of its log."""
    if proc.poll() is not None:
        raise AssertionError(f"worker exited with {proc.returncode}: {tail(log)}")
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthy(port: int) -> bool:
    """GET /healthz of a worker on this host answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:  # not listening yet, or 503 while it starts
        return False


async def spawn_started(
    worker: str, env: dict[str, str], log: Path, *, module: str = "workers.cli"
) -> subprocess.Popen[bytes]:
    """``spawn``, returned once /healthz answers: the worker runs and SIGTERM drains it (a
    SIGTERM before its handler is set ends the process, exit code -15)."""
    port = free_port()
    proc = spawn(worker, {**env, "TICKWIRE_METRICS_PORT": str(port)}, log, module=module)

    async def up() -> bool:
        return running(proc, log) and await asyncio.to_thread(healthy, port)

    try:
        await eventually(up, timeout=300, what=f"{worker} started")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


@contextlib.asynccontextmanager
async def started_worker(
    worker: str, env: dict[str, str], log: Path, *, module: str = "workers.cli"
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``spawn_started``, stopped by SIGTERM (and waited for) when the block ends."""
    proc = await spawn_started(worker, env, log, module=module)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)
