"""Candles into QuestDB over ILP/HTTP: one transactional request per batch, upsert by key.

The candles table is a WAL table with ``DEDUP UPSERT KEYS(ts, feed, symbol, tf)``: writing
the same candle again replaces it, and revisions are written in order, so the row left is
the latest revision. A failed request raises ``TransientError``: the worker holds its batch
and writes the same rows again later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from questdb import QuestDBError, Sender, TimestampMicros, TimestampNanos

from contracts.messages import Candle
from db.questdb import QuestDBError as QuestDBUnavailable
from db.questdb import apply_ddl, table_name
from workers.runtime.errors import TransientError


class QuestDBSink:
    def __init__(self, ilp_conf: str, http_url: str, *, table_prefix: str = "") -> None:
        conf = ilp_conf if ilp_conf.endswith(";") else ilp_conf + ";"
        # fail fast and let the runtime's backoff do the waiting
        if "retry_timeout" not in conf:
            conf += "retry_timeout=2000;"
        if "request_timeout" not in conf:
            conf += "request_timeout=10000;"
        self._conf = conf
        self._http_url = http_url
        self._prefix = table_prefix
        self.table = table_name("candles", table_prefix=table_prefix)
        self._sender: Sender | None = None

    async def start(self) -> None:
        try:
            await asyncio.to_thread(apply_ddl, self._http_url, table_prefix=self._prefix)
        except (OSError, QuestDBUnavailable) as exc:
            raise TransientError(f"QuestDB not ready: {exc}") from exc
        self._sender = Sender.from_conf(self._conf)
        self._sender.establish()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close(flush=False)
            self._sender = None

    async def write(self, candles: Sequence[Candle]) -> None:
        if candles:
            await asyncio.to_thread(self._write, candles)

    def _write(self, candles: Sequence[Candle]) -> None:
        sender = self._sender
        assert sender is not None, "sink not started"
        buf = sender.new_buffer()
        table = self.table
        for c in candles:
            buf.row(
                table,
                symbols={"feed": c.feed, "symbol": c.symbol, "tf": c.tf.value},
                columns={
                    "close_time": TimestampMicros(c.close_time_ms * 1000),
                    "open": c.open,
                    "high": c.high,
                    "low": c.low,
                    "close": c.close,
                    "tick_volume": c.tick_volume,
                    "real_volume": c.real_volume,
                    "spread_mean": c.spread_mean,
                    "spread_max": c.spread_max,
                    "first_tick_ms": c.first_tick_ms,
                    "last_tick_ms": c.last_tick_ms,
                    "revision": c.revision,
                    "v": c.v,
                },
                at=TimestampNanos(c.open_time_ms * 1_000_000),
            )
        try:
            sender.flush(buf, transactional=True)
        except QuestDBError as exc:
            raise TransientError(f"QuestDB write of {len(candles)} candles failed: {exc}") from exc
