"""Every worker as its own process (``workers.up.Launcher``, as ``tickwire up`` runs them) in a
fresh namespace: simulated EA ticks go through, and each worker's /metrics is scraped.

Counts are checked against what the test itself computes from the ticks it sent (distinct
minutes = M1 candles, and so on). The deployment files are checked too: Prometheus scrapes
the launcher's ports, every metric the Grafana dashboard queries is served, and a real
Prometheus, configured by infra/prometheus.yml, answers every dashboard query with data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from contracts import subjects
from contracts.codec import encode
from contracts.messages import Tick, TickRow, Timeframe, Watermark
from contracts.streams import consumer_specs, ensure, stream_specs
from db.migrate import migrate
from infra.stack import REPO, StackUrls
from tests.scorer_models import card_for, train
from tests.waiting import eventually
from workers import replay
from workers.cli import WORKERS
from workers.demo import Samples, scrape, total
from workers.ea_sim import market
from workers.features import DEFAULT
from workers.registry import Registry
from workers.up import Launcher, default_ports

pytestmark = pytest.mark.integration

FEED, SYMBOL = "obs", "EURUSD"
START_MS = 1_763_460_000_000  # Tuesday 2025-11-18 10:00 UTC: the simulated market is open
SPAN_MS = 45 * 60_000
POLICY = {  # every score >= -0.99 enters long: the first scored candle gives a signal
    "defaults": {"entry_long": -0.99, "exit_long": -1.0, "entry_short": -1.0, "exit_short": -0.995}
}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
async def pipeline(
    stack: StackUrls, js: JetStreamContext, unique: str, pg_dsn: str, tmp_path: Path
) -> AsyncIterator[tuple[Launcher, str]]:
    ns = unique
    await migrate(pg_dsn)
    await ensure(js, stream_specs(namespace=ns), consumer_specs(namespace=ns))
    registry = await Registry.open(js, namespace=ns)
    booster = train(1)
    version = await registry.put(
        booster.model_to_string().encode(), card_for(booster, FEED, SYMBOL, Timeframe.M1)
    )
    await registry.promote(version, force=True)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKWIRE_")}
    env |= stack.env() | {
        "TICKWIRE_POSTGRES_DSN": pg_dsn,
        "TICKWIRE_IDLE_CLOSE": "false",
        "TICKWIRE_SIGNAL_POLICY_FILE": str(policy),
        "TICKWIRE_TRAIN_SCHEDULE": f"{FEED}/{SYMBOL}/M1@30 3 * * *",
        "TICKWIRE_PULL_EXPIRES_S": "1",
    }
    ports = dict(zip(WORKERS, _free_ports(len(WORKERS)), strict=True))
    launcher = Launcher(list(WORKERS), log_dir=tmp_path, ports=ports, env=env, namespace=ns)
    try:
        launcher.start()
        launcher.wait_healthy(90)
        yield launcher, ns
    finally:
        launcher.stop()
        with contextlib.suppress(replay.ReplayError):
            await replay.delete(js, ns, questdb_http=stack.questdb_http)
        for delete in (js.delete_object_store, js.delete_key_value):
            with contextlib.suppress(Exception):
                await delete(f"ns-{ns}-models")


def _scrape_all(launcher: Launcher) -> dict[str, Samples]:
    return {name: scrape(c.metrics_url) for name, c in launcher.children.items()}


async def _send_ticks(js: JetStreamContext, ns: str) -> list[TickRow]:
    """SPAN_MS of simulated ticks, one malformed message and the watermark that closes the
    last candle; the rows of the ticks sent."""
    rows: list[TickRow] = []
    for t, _, _, row in market.ticks(5, [FEED], [SYMBOL], START_MS):
        if t >= START_MS + SPAN_MS:
            break
        rows.append(row)
    for row in rows:
        tick = Tick(
            feed=FEED, symbol=SYMBOL, time_ms=row.time_ms, bid=row.bid, ask=row.ask, seq=row.seq
        )
        await js.publish_async(subjects.ticks(FEED, SYMBOL, namespace=ns), encode(tick))
    await js.publish(subjects.ticks(FEED, SYMBOL, namespace=ns), b'{"type":"tick",')
    end = START_MS + SPAN_MS
    wm = Watermark(feed=FEED, symbol=SYMBOL, time_ms=end)
    await js.publish(
        subjects.ticks(FEED, SYMBOL, namespace=ns), encode(wm), headers={"Nats-Msg-Id": wm.msg_id}
    )
    return rows


async def test_every_worker_serves_metrics_that_move(
    pipeline: tuple[Launcher, str], js: JetStreamContext
) -> None:
    launcher, ns = pipeline
    before = _scrape_all(launcher)
    rows = await _send_ticks(js, ns)
    minutes = len({r.time_ms // 60_000 for r in rows})

    def through() -> bool:
        """Everything sent has had its effect: the last candle's score, a signal in
        PostgreSQL, the malformed message's dead letter (each counted after its own commit)."""
        now = _scrape_all(launcher)
        ready = total(now["feature-builder"], "tickwire_feature_vectors_out_total", tf="M1",
                      warming_up="false")  # fmt: skip
        return (
            total(now["timescale-replicator"], "tickwire_replicated_rows_total", stream="SIGNALS")
            > 0
            and total(now["candle-ingest"], "tickwire_dead_letters_total") >= 1
            and ready == minutes - DEFAULT.warmup + 1
            and total(now["model-scorer"], "tickwire_scores_out_total", tf="M1") >= ready
        )

    await eventually(through, timeout=90, interval=0.5)
    after = _scrape_all(launcher)
    assert all(total(s, "tickwire_ticks_in_total") == 0 for s in before.values())
    ci, fb, ms = after["candle-ingest"], after["feature-builder"], after["model-scorer"]
    sp, tr = after["signal-publisher"], after["timescale-replicator"]
    assert total(ci, "tickwire_ticks_in_total", outcome="accepted") == len(rows)
    assert total(ci, "tickwire_candles_out_total", tf="M1") == minutes
    assert total(fb, "tickwire_feature_vectors_out_total", tf="M1") == minutes
    ready = total(fb, "tickwire_feature_vectors_out_total", tf="M1", warming_up="false")
    assert ready == minutes - DEFAULT.warmup + 1
    assert total(ms, "tickwire_scores_out_total", tf="M1") == ready
    assert total(sp, "tickwire_signals_out_total") >= 1
    assert total(tr, "tickwire_replicated_rows_total", stream="CANDLES") >= minutes
    assert total(ci, "tickwire_dead_letters_total", reason="malformed_json") == 1
    for worker in ("candle-ingest", "feature-builder", "model-scorer", "signal-publisher"):
        assert any(n == "tickwire_consumer_pending" for n, _ in after[worker]), worker
    for c in launcher.children.values():
        assert await asyncio.to_thread(c.healthy), c.name

    served = {n for s in after.values() for n, _ in s}
    for c in launcher.children.values():  # declared series without a sample yet count too
        text = await asyncio.to_thread(lambda u=c.metrics_url: urllib.request.urlopen(u).read())
        served |= set(re.findall(r"^# TYPE (\S+)", text.decode(), re.MULTILINE))
    families = served | {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in served}
    queried = set()
    for expr in re.findall(r'"expr":\s*"((?:[^"\\]|\\.)*)"', DASHBOARD.read_text()):
        queried |= set(re.findall(r"\btickwire_[a-z0-9_]+", expr))
    assert queried, "the dashboard queries no tickwire metric"
    assert sorted(queried - families) == []


DASHBOARD = REPO / "infra" / "grafana" / "dashboards" / "tickwire.json"


def test_prometheus_scrapes_the_launchers_ports() -> None:
    text = (REPO / "infra" / "prometheus.yml").read_text()
    targets = dict(re.findall(r'targets: \["([a-z-]+):(\d+)"\]', text))
    assert {k: int(v) for k, v in targets.items() if k in WORKERS} == default_ports()


PROMETHEUS = REPO / ".cache" / "prometheus" / "usr" / "bin" / "prometheus"
# Series that exist only once something happened that this run does not make happen.
MAY_BE_EMPTY = {
    "tickwire_publish_failures_total": "no publish fails",
    "tickwire_scheduler_runs_total": "no training run is due",
}


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legend) of every query, those of panels in rows too."""

    def panels(ps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [q for p in ps for q in [p, *panels(p.get("panels", []))]]

    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (p["title"], t["expr"].replace("$worker", ".*"), t.get("legendFormat", ""))
        for p in panels(dashboard["panels"])
        for t in p.get("targets", [])
    ]


@contextlib.contextmanager
def _prometheus(launcher: Launcher, tmp_path: Path) -> Iterator[str]:
    """Debian's Prometheus with infra/prometheus.yml, its targets the launcher's ports and
    its intervals 1 s; its URL."""
    binary = PROMETHEUS if PROMETHEUS.exists() else shutil.which("prometheus")
    if binary is None:
        pytest.skip(f"no prometheus at {PROMETHEUS} (`make test` fetches it) nor on the PATH")
    ports = {name: c.port for name, c in launcher.children.items()}
    replaced: set[str] = set()

    def target(m: re.Match[str]) -> str:
        if m[1] not in ports:
            return m[0]
        replaced.add(m[1])
        return f'"127.0.0.1:{ports[m[1]]}"'

    text = re.sub(r'"([a-z-]+):\d+"', target, (REPO / "infra" / "prometheus.yml").read_text())
    text = re.sub(r"(scrape_interval|scrape_timeout|evaluation_interval): \d+s", r"\1: 1s", text)
    assert replaced == set(WORKERS)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    [port] = _free_ports(1)
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _api(url: str, path: str, **params: str) -> Any:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{query}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


async def test_every_dashboard_query_answers_in_a_real_prometheus(
    pipeline: tuple[Launcher, str], js: JetStreamContext, tmp_path: Path
) -> None:
    """Prometheus scrapes every worker through infra/prometheus.yml while ticks go through;
    then each dashboard query has a series with a number, and the labels its legend names."""
    launcher, ns = pipeline
    with _prometheus(launcher, tmp_path) as url:

        async def query(expr: str) -> list[dict[str, Any]]:
            try:
                data = await asyncio.to_thread(_api, url, "query", query=expr)
            except OSError:  # not listening yet
                return []
            return list(data["result"])

        async def all_up() -> bool:
            up = await query('up{job="tickwire"}')
            return len(up) == len(WORKERS) and all(r["value"][1] == "1" for r in up)

        await eventually(all_up, timeout=60, interval=0.5, what="every worker scraped")
        await _send_ticks(js, ns)

        async def answered(expr: str, legend: str) -> bool:
            result = await query(expr)
            labels = re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)
            return any(
                math.isfinite(float(r["value"][1])) and all(k in r["metric"] for k in labels)
                for r in result
            )

        for title, expr, legend in _dashboard_queries():
            if any(name in expr for name in MAY_BE_EMPTY):
                await query(expr)  # still a query Prometheus takes
                continue
            await eventually(
                lambda e=expr, g=legend: answered(e, g),
                timeout=90,
                interval=1,
                what=f"{title}: {expr}",
            )
        workers = await asyncio.to_thread(
            _api, url, "label/worker/values", **{"match[]": "tickwire_up"}
        )
        assert sorted(workers) == sorted(WORKERS)  # the dashboard's worker list
