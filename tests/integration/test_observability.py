"""Every worker as its own process (``workers.up.Launcher``, as ``tickwire up`` runs them) in a
fresh namespace: simulated EA ticks go through, and each worker's /metrics is scraped.

Counts are checked against what the test itself computes from the ticks it sent (distinct
minutes = M1 candles, and so on). The deployment files are checked too: Prometheus scrapes
the launcher's ports, and every metric the Grafana dashboard queries is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

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


async def test_every_worker_serves_metrics_that_move(
    pipeline: tuple[Launcher, str], js: JetStreamContext
) -> None:
    launcher, ns = pipeline
    before = _scrape_all(launcher)
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
    minutes = len({r.time_ms // 60_000 for r in rows})

    def get(worker: str, name: str, **labels: str) -> float:
        return total(_scrape_all(launcher)[worker], name, **labels)

    await eventually(
        lambda: get("timescale-replicator", "tickwire_replicated_rows_total", stream="SIGNALS") > 0,
        timeout=90,
        interval=0.5,
    )
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
