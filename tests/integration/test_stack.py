"""The local stack's servers are real: they store, answer, survive restarts and die with us."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js import JetStreamContext
from questdb import Sender, TimestampNanos

from infra.stack import LocalStack, NatsServer, PostgresServer, QuestDBUrls, pid_alive

pytestmark = pytest.mark.integration


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tickwire-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_jetstream_publish_and_consume(js: JetStreamContext, unique: str) -> None:
    await js.add_stream(name=unique, subjects=[f"{unique}.>"])
    ack = await js.publish(f"{unique}.tick", b"EURUSD 1.0841", headers={"Nats-Msg-Id": "1"})
    duplicate = await js.publish(f"{unique}.tick", b"EURUSD 1.0841", headers={"Nats-Msg-Id": "1"})
    assert (ack.seq, duplicate.duplicate) == (1, True)

    consumer = await js.pull_subscribe(f"{unique}.>", durable="reader", stream=unique)
    [msg] = await consumer.fetch(1, timeout=10)
    assert msg.data == b"EURUSD 1.0841"
    await msg.ack_sync()
    info = await js.consumer_info(unique, "reader")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    await js.delete_stream(unique)


async def test_postgres_select_and_create_table(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("select 1") == 1
        await conn.execute("create table candle (symbol text primary key, close numeric)")
        await conn.execute("insert into candle values ($1, $2)", "EURUSD", 1.0841)
        assert await conn.fetchval("select count(*) from candle") == 1
    finally:
        await conn.close()


async def test_each_test_gets_its_own_database(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("select to_regclass('candle')") is None
    finally:
        await conn.close()


def questdb_sql(questdb: QuestDBUrls, query: str) -> dict[str, object]:
    url = f"{questdb.http}/exec?{urllib.parse.urlencode({'query': query})}"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        result: dict[str, object] = json.load(response)
        return result


def test_questdb_sql_over_http_and_ilp(questdb: QuestDBUrls, unique: str) -> None:
    assert questdb_sql(questdb, "select 1")["dataset"] == [[1]]

    questdb_sql(
        questdb,
        f"create table {unique}_sql (symbol symbol, price double, ts timestamp) "
        "timestamp(ts) partition by day wal",
    )
    questdb_sql(questdb, f"insert into {unique}_sql values ('EURUSD', 1.0841, now())")

    with Sender.from_conf(questdb.ilp_conf) as sender:
        sender.row(
            f"{unique}_ilp",
            symbols={"symbol": "EURUSD"},
            columns={"price": 1.0841},
            at=TimestampNanos.now(),
        )

    # WAL tables become visible once the WAL is applied: wait for it.
    for table in (f"{unique}_sql", f"{unique}_ilp"):
        wait_for(
            lambda table=table: (
                questdb_sql(questdb, f"select count() from {table}")["dataset"] == [[1]]
            ),
            what=f"one row in {table}",
        )


def test_a_stack_of_nats_alone() -> None:
    stack = LocalStack(postgres=False, questdb=False)
    with stack:
        urls = stack.urls
        assert urls.nats_url is not None
        assert (urls.postgres_dsn, urls.questdb) == (None, None)
        assert urls.env() == {"TICKWIRE_NATS_URL": urls.nats_url}
        assert stack.root.is_dir()
    assert not stack.root.exists()


def test_servers_are_seen_ready_whatever_the_proxy_settings(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy for the user's web traffic (http_proxy, without no_proxy) must not stand
    between the stack and its servers' loopback ports."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead}")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = NatsServer(private_dir / "nats", start_timeout=15)
    server.start()
    try:
        assert server.running  # start() waits until the server says it is ready
    finally:
        server.stop()


def test_postgres_restart_and_crash_keep_committed_rows(private_dir: Path) -> None:
    server = PostgresServer(private_dir)
    try:
        server.start()
        port = server.port
        server.psql("create table fill (id int primary key); insert into fill values (1);")

        server.stop()
        assert not server.running
        server.start()
        assert server.port == port
        assert server.psql("select id from fill").split() == ["1"]

        server.psql("insert into fill values (2)")
        server.kill()  # crash: no shutdown checkpoint, recovery replays the WAL
        server.start()
        assert server.psql("select id from fill order by id").split() == ["1", "2"]
    finally:
        server.stop()
    assert not server.running


async def test_nats_restart_keeps_stream(private_dir: Path, unique: str) -> None:
    server = NatsServer(private_dir)
    server.start()
    try:
        nc = await nats.connect(server.url, connect_timeout=5)
        js = nc.jetstream()
        await js.add_stream(name=unique, subjects=[f"{unique}.>"])
        await js.publish(f"{unique}.tick", b"kept")
        await nc.close()

        server.restart()

        nc = await nats.connect(server.url, connect_timeout=5)
        msg = await nc.jetstream().get_msg(unique, seq=1)
        assert msg.data == b"kept"
        await nc.close()
    finally:
        server.stop()


def test_servers_die_with_a_killed_parent(private_dir: Path) -> None:
    script = (
        "import sys\n"
        "from infra.stack import LocalStack, NatsServer, PostgresServer\n"
        "servers = [NatsServer(sys.argv[1]), PostgresServer(sys.argv[1])]\n"
        "for server in servers:\n"
        "    server.start()\n"
        "print(*(server.pid for server in servers), flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(private_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(children) == 2
        assert all(pid_alive(pid) for pid in children)
        os.kill(parent.pid, signal.SIGKILL)  # no atexit, no signal handler: only the kernel
        parent.wait(10)
        wait_for(lambda: not any(map(pid_alive, children)), timeout=10, what="servers to die")
    finally:
        parent.kill()
        parent.wait()

    # The crashed PostgreSQL starts again on its data directory.
    server = PostgresServer(private_dir)
    try:
        server.start()
        assert server.psql("select 1").split() == ["1"]
    finally:
        server.stop()
