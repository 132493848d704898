"""``tickwire up``: every worker as a child process, each with its own /metrics and /healthz.

``Launcher`` is the reusable part (``make demo`` and the tests use it): start each worker as
``python -m workers.cli run NAME`` with ``TICKWIRE_METRICS_PORT`` set and its output in a
log file of its own, wait until every /healthz answers 200, notice a worker that died, and
stop them all: SIGTERM (a worker drains what it holds), a grace period, then SIGKILL. A
metrics port already in use is refused before any worker starts, and a worker gets SIGTERM
from the kernel when its launcher dies without stopping it (kill -9).

The default ports are those ``infra/prometheus.yml`` scrapes: 9101.. in ``WORKERS`` order.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final

from infra.stack import LOOPBACK
from workers.cli import WORKERS, fail

BASE_PORT: Final = 9101
HEALTH_TIMEOUT_S: Final = 60.0
STOP_GRACE_S: Final = 25.0
"""More than a worker's ``drain_timeout_s`` (20 s): it gets to finish what it holds."""
TAIL_LINES: Final = 15
POLL_S: Final = 0.2


def default_ports(base: int = BASE_PORT) -> dict[str, int]:
    """Worker -> metrics port: ``base``, ``base + 1``, ... in ``WORKERS`` order."""
    return {name: base + i for i, name in enumerate(WORKERS)}


class LaunchError(RuntimeError):
    """A worker did not come up, or died; the message names it and ends with its log."""


@dataclass
class Child:
    name: str
    port: int
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    def tail(self, lines: int = TAIL_LINES) -> str:
        try:
            with self.log.open("rb") as f:
                last = collections.deque(f, maxlen=lines)
        except OSError:
            return ""
        return b"".join(last).decode(errors="replace").rstrip()

    def healthy(self) -> bool:
        try:
            with LOOPBACK.open(self.health_url, timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False


_PR_SET_PDEATHSIG: Final = 1


def _end_with_launcher() -> Callable[[], None] | None:
    """A preexec_fn: the child gets SIGTERM when the launcher dies. The kernel sends it when
    the forking *thread* ends, so only for children started from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the worker's server
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines()) or "    (no output)"


class Launcher:
    """Start, watch and stop worker processes. A context manager: leaving it stops them."""

    def __init__(
        self,
        workers: Sequence[str],
        *,
        log_dir: Path,
        ports: Mapping[str, int] | None = None,
        env: Mapping[str, str] | None = None,
        namespace: str | None = None,
    ) -> None:
        unknown = [w for w in workers if w not in WORKERS]
        if unknown:
            raise ValueError(f"unknown workers: {', '.join(unknown)}")
        self.workers = list(workers)
        self.ports = {**default_ports(), **(ports or {})}
        self.log_dir = log_dir
        self.env = dict(os.environ if env is None else env)
        if namespace is not None:
            self.env["TICKWIRE_NAMESPACE"] = namespace
        self.children: dict[str, Child] = {}

    def start(self) -> None:
        """Start every worker; ``LaunchError`` before any starts if a port is in use."""
        host = self.env.get("TICKWIRE_METRICS_HOST", "127.0.0.1")
        for name in self.workers:
            if _port_in_use(host, self.ports[name]):
                raise LaunchError(
                    f"port {self.ports[name]} for {name} is in use"
                    " (another tickwire up still running?)"
                )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        preexec = _end_with_launcher()
        for name in self.workers:
            log = self.log_dir / f"{name}.log"
            env = self.env | {"TICKWIRE_METRICS_PORT": str(self.ports[name])}
            with log.open("ab") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "workers.cli", "run", name],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    # Ctrl-C in the terminal reaches the launcher only; it stops them in turn
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            self.children[name] = Child(name, self.ports[name], log, process)

    def dead(self) -> list[Child]:
        """Workers whose process has exited."""
        return [c for c in self.children.values() if c.process.poll() is not None]

    def check_alive(self) -> None:
        """Raise ``LaunchError`` for the first worker that exited."""
        for c in self.dead():
            raise LaunchError(
                f"{c.name} exited with code {c.process.returncode}; the end of {c.log}:\n"
                + _indented(c.tail())
            )

    def wait_healthy(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Return once every worker's /healthz answers 200; ``LaunchError`` otherwise."""
        waiting = dict(self.children)
        deadline = time.monotonic() + timeout_s
        while waiting:
            self.check_alive()
            for name in [n for n, c in waiting.items() if c.healthy()]:
                del waiting[name]
            if not waiting:
                return
            if time.monotonic() > deadline:
                c = next(iter(waiting.values()))
                raise LaunchError(
                    f"{c.name} not healthy on {c.health_url} after {timeout_s:g} s"
                    f" (also waiting: {', '.join(waiting) or 'none'}); the end of {c.log}:\n"
                    + _indented(c.tail())
                )
            time.sleep(POLL_S)  # polling a child's HTTP endpoint, with a deadline

    def stop(self, grace_s: float = STOP_GRACE_S) -> dict[str, int]:
        """SIGTERM to all, wait up to ``grace_s``, SIGKILL what is left; exit codes."""
        for c in self.children.values():
            if c.process.poll() is None:
                c.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        codes = {}
        for c in self.children.values():
            try:
                codes[c.name] = c.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.process.kill()
                codes[c.name] = c.process.wait()
        return codes

    def __enter__(self) -> Launcher:
        try:
            self.start()
        except BaseException:  # those started before the one that failed stop with it
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Stopped(Exception):
    """SIGTERM or SIGHUP (the terminal closed) arrived."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Stopped


def _check_namespace(namespace: str) -> None:
    """One line and exit 2 unless ``namespace`` is a replay that exists."""
    import asyncio

    from contracts import subjects
    from workers import replay
    from workers.runtime.connection import connect
    from workers.runtime.settings import RuntimeSettings, load

    try:
        subjects.check_name(namespace, "namespace")
    except subjects.SubjectError as exc:
        fail(str(exc))
    settings = load(RuntimeSettings)

    async def known() -> list[str]:
        nc = await asyncio.wait_for(connect(settings, name="tickwire-up"), 15)
        try:
            return await replay.names(nc.jetstream())
        finally:
            await nc.close()

    try:
        names = asyncio.run(known())
    except (OSError, TimeoutError) as exc:
        fail(f"cannot reach NATS at {settings.nats_url}: {exc!r}")
    if namespace not in names:
        fail(f"no replay namespace {namespace!r} (known: {', '.join(names) or 'none'})")


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.base_port <= 65535 - len(WORKERS):
        fail(f"--base-port must leave room for {len(WORKERS)} ports: {args.base_port}")
    if args.namespace is not None:
        _check_namespace(args.namespace)
    ports = default_ports(args.base_port)
    launcher = Launcher(
        args.workers or list(WORKERS), log_dir=args.log_dir, ports=ports, namespace=args.namespace
    )
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_sigterm)
    code = 0
    try:
        launcher.start()
        launcher.wait_healthy(args.timeout)
        where = f" in namespace {args.namespace}" if args.namespace else ""
        print(f"tickwire up: {len(launcher.children)} workers healthy{where}; Ctrl-C stops them")
        for c in launcher.children.values():
            print(f"  {c.name:21} pid {c.process.pid:<8} {c.metrics_url}  log {c.log}")
        sys.stdout.flush()
        while True:
            launcher.check_alive()
            time.sleep(POLL_S)  # watching children until a signal or a death
    except LaunchError as exc:
        sys.stderr.write(f"tickwire up: {exc}\n")
        code = 1
    except (KeyboardInterrupt, Stopped):
        print("tickwire up: stopping ...", flush=True)
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        codes = launcher.stop()
    for name, rc in codes.items():
        if rc not in (0, -signal.SIGTERM):
            print(f"  {name} stopped with exit code {rc}")
    return code
