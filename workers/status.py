"""``tickwire status``: streams, consumers and their lag, worker health, active models.

One report in four sections, each a table; a part that is missing (no model registry yet,
a worker not running, NATS or its JetStream not answering) is said in its section and the
rest still shows.

Lag of a consumer, from the server's view of it (also the replicator's lag):

- messages: published on the stream and not yet acked by the consumer (not yet delivered
  plus delivered and waiting for an ack);
- seconds: stream time between the stream's last message and the last message the consumer
  has acked everything up to (its ack floor); 0 when it has nothing left.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Final

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, StreamInfo
from nats.js.errors import NotFoundError
from pydantic import Field

from workers.runtime import partition
from workers.runtime.connection import connect_once
from workers.runtime.partition import ack_floors, behind, consumers_of
from workers.runtime.settings import RuntimeSettings


@dataclass(frozen=True, slots=True)
class Lag:
    stream: str
    consumer: str
    not_delivered: int
    ack_pending: int
    ack_floor: int
    last_seq: int
    seconds: float
    ahead: tuple[str, ...] = ()
    """Durables of another layout of the same worker past this one: it is stale."""
    waiting: int = 0
    """Pull requests waiting at the server: more than none while an instance consumes."""

    @property
    def messages(self) -> int:
        return self.not_delivered + self.ack_pending


async def _time_of(js: JetStreamContext, stream: str, seq: int) -> datetime | None:
    """Stream time of message ``seq``, or of the next one if it is gone."""
    try:
        msg = await js.get_msg(stream, seq, next=True)
    except NotFoundError:
        return None
    return msg.time


async def consumer_lag(
    js: JetStreamContext,
    stream: str,
    consumer: str,
    *,
    info: ConsumerInfo | None = None,
    stream_info: StreamInfo | None = None,
) -> Lag:
    info = info or await js.consumer_info(stream, consumer)
    sinfo = stream_info or await js.stream_info(stream)
    state = sinfo.state
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    not_delivered = info.num_pending or 0
    ack_pending = info.num_ack_pending or 0
    seconds = 0.0
    if not_delivered + ack_pending and state.messages:
        newest, oldest = await asyncio.gather(
            _time_of(js, stream, state.last_seq),
            _time_of(js, stream, max(floor, state.first_seq)),
        )
        if newest is not None and oldest is not None:
            seconds = max(0.0, (newest - oldest).total_seconds())
    return Lag(
        stream,
        consumer,
        not_delivered,
        ack_pending,
        floor,
        state.last_seq,
        seconds,
        waiting=info.num_waiting or 0,
    )


async def every_lag(js: JetStreamContext) -> list[Lag]:
    """Every consumer of every stream, by stream and consumer name."""
    out: list[Lag] = []
    for sinfo in sorted(await partition.every_stream(js), key=lambda s: s.config.name or ""):
        stream = sinfo.config.name or ""
        infos = sorted(await consumers_of(js, stream), key=lambda c: c.name)
        floors = ack_floors(infos)
        for info in infos:
            lag = await consumer_lag(js, stream, info.name, info=info, stream_info=sinfo)
            out.append(dataclasses.replace(lag, ahead=tuple(behind(info.name, floors))))
    return out


HEADER = ("stream", "consumer", "last seq", "ack floor", "not delivered", "ack pending",
          "lag msgs", "lag s", "pulls waiting", "note")  # fmt: skip
STREAM_HEADER = ("stream", "messages", "bytes", "first", "last")
WORKER_HEADER = ("worker", "address", "health")
MODEL_HEADER = ("feed", "symbol", "tf", "version", "feature set", "auc")

# Ports of /healthz in docker-compose.yml and infra/prometheus.yml.
DEFAULT_HEALTH: Final = (
    "candle-ingest=127.0.0.1:9101,feature-builder=127.0.0.1:9102,model-scorer=127.0.0.1:9103,"
    "signal-publisher=127.0.0.1:9104,timescale-replicator=127.0.0.1:9105,"
    "scheduler=127.0.0.1:9106"
)


class Settings(RuntimeSettings):
    """What ``tickwire status`` reads besides the NATS connection."""

    health: str = DEFAULT_HEALTH
    """``worker=host:port`` pairs, comma-separated: where each worker serves /healthz."""
    health_timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0


def health_targets(text: str) -> list[tuple[str, str, int]]:
    """``"a=host:1,b=host:2"`` as (worker, host, port); ValueError names a bad pair."""
    out = []
    for pair in (p.strip() for p in text.split(",")):
        if not pair:
            continue
        worker, sep, address = pair.partition("=")
        host, colon, port = address.rpartition(":")
        if not (sep and colon and worker.strip() and host and port.isdigit()):
            raise ValueError(f"not worker=host:port: {pair!r}")
        if not 0 < int(port) < 65536:
            raise ValueError(f"port out of range: {pair!r}")
        out.append((worker.strip(), host.removeprefix("[").removesuffix("]"), int(port)))
    return out


def render(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> list[str]:
    """An aligned text table: the first ``left`` columns to the left, numbers to the right."""
    table_rows = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in table_rows) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        cells = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [line(r) for r in table_rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(lags: list[Lag]) -> str:
    rows = [
        (
            lag.stream,
            lag.consumer,
            str(lag.last_seq),
            str(lag.ack_floor),
            str(lag.not_delivered),
            str(lag.ack_pending),
            str(lag.messages),
            f"{lag.seconds:.1f}",
            str(lag.waiting),
            f"stale: behind {', '.join(lag.ahead)}" if lag.ahead else "",
        )
        for lag in lags
    ]
    lines = render(HEADER, rows, left=2)
    if not lags:
        lines.append("(no consumers)")
    return "\n".join(lines)


def when(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True, slots=True)
class StreamRow:
    name: str
    messages: int
    bytes: int
    first: datetime | None
    last: datetime | None

    def cells(self) -> tuple[str, ...]:
        return (self.name, str(self.messages), str(self.bytes), when(self.first), when(self.last))


async def every_stream(js: JetStreamContext) -> list[StreamRow]:
    out = []
    for info in sorted(await partition.every_stream(js), key=lambda s: s.config.name or ""):
        name, state = info.config.name or "", info.state
        first = last = None
        if state.messages:
            first, last = await asyncio.gather(
                _time_of(js, name, state.first_seq), _time_of(js, name, state.last_seq)
            )
        out.append(StreamRow(name, state.messages, state.bytes, first, last))
    return out


async def probe(host: str, port: int, timeout_s: float) -> str:
    """``up``, ``unhealthy`` (503) or ``down (<why>)`` from one ``GET /healthz``."""

    async def get() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET /healthz HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            return await reader.readline()
        finally:
            writer.close()

    try:
        status_line = await asyncio.wait_for(get(), timeout_s)
    except TimeoutError:
        return f"down (no answer in {timeout_s:g}s)"
    except OSError as exc:
        return f"down ({exc.strerror or type(exc).__name__})"
    parts = status_line.split()
    code = parts[1].decode(errors="replace") if len(parts) > 1 else "?"
    if code == "200":
        return "up"
    if code == "503":
        return "unhealthy"
    return f"down (HTTP {code})"


async def worker_health(
    targets: Sequence[tuple[str, str, int]], timeout_s: float
) -> list[tuple[str, str, str]]:
    states = await asyncio.gather(*(probe(h, p, timeout_s) for _, h, p in targets))
    return [(w, f"{h}:{p}", s) for (w, h, p), s in zip(targets, states, strict=True)]


async def active_models(js: JetStreamContext, namespace: str | None) -> list[tuple[str, ...]]:
    """Rows of the active model of every series; RegistryError when there is no registry."""
    from contracts.models import ModelStatus
    from workers.registry import Registry

    registry = await Registry.open(js, namespace=namespace, create=False)
    rows = []
    for card in await registry.list():
        if card.status is ModelStatus.ACTIVE:
            auc = card.metrics.get("auc")
            rows.append(
                (
                    card.feed,
                    card.symbol,
                    card.tf.value,
                    card.version,
                    card.feature_set_id,
                    "-" if auc is None else f"{auc:.4f}",
                )
            )
    return sorted(rows)


def section(title: str, lines: list[str]) -> str:
    return "\n".join([f"== {title} ==", *lines])


async def report(settings: Settings) -> tuple[str, bool]:
    """The whole report, and whether NATS answered."""
    health = asyncio.ensure_future(
        worker_health(health_targets(settings.health), settings.health_timeout_s)
    )
    streams: list[str]
    consumers: list[str]
    models: list[str]
    ok = True
    try:
        nc = await connect_once(settings, "tickwire-status")
    except (TimeoutError, OSError) as exc:
        ok = False
        why = f"(NATS at {settings.nats_url} did not answer: {exc!r})"
        streams = consumers = models = [why]
    else:
        missing: list[str] = []
        streams = consumers = models = missing
        try:
            js = nc.jetstream()
            found = await every_stream(js)
            streams = render(STREAM_HEADER, [s.cells() for s in found])
            if not found:
                streams.append("(no streams)")
            consumers = table(await every_lag(js)).split("\n")
            from workers.registry import RegistryError  # LightGBM: only when NATS answered

            try:
                rows = await active_models(js, settings.namespace)
            except RegistryError as exc:
                models = [f"({exc}: no model trained and stored yet)"]
            else:
                models = render(MODEL_HEADER, rows, left=len(MODEL_HEADER))
                if not rows:
                    models.append("(no active models)")
        except NatsError as exc:
            # JetStream not answering (a cluster without quorum, a user without permission):
            # said in each section not read yet; what was read and the workers still show
            ok = False
            said = [f"(JetStream at {settings.nats_url} did not answer: {exc!r})"]
            streams, consumers, models = (
                said if part is missing else part for part in (streams, consumers, models)
            )
        finally:
            await nc.close()
    workers = await health
    worker_lines = render(WORKER_HEADER, workers, left=len(WORKER_HEADER))
    if not workers:
        worker_lines.append("(no workers configured: TICKWIRE_HEALTH)")
    text = "\n\n".join(
        [
            section("streams", streams),
            section("consumers", consumers),
            section("workers", worker_lines),
            section("active models", models),
        ]
    )
    return text, ok


def main() -> int:
    """``tickwire status`` from ``TICKWIRE_*``: exit 0, or 1 when NATS or its JetStream did
    not answer."""
    from workers.cli import fail
    from workers.runtime.settings import load

    settings = load(Settings)
    try:
        health_targets(settings.health)
    except ValueError as exc:
        fail(f"bad setting TICKWIRE_HEALTH: {exc}")
    text, ok = asyncio.run(report(settings))
    print(text)
    return 0 if ok else 1
