"""timescale-replicator: CANDLES, FEATURES, SCORES, SIGNALS -> PostgreSQL/TimescaleDB.

consume each stream on its own durable (``timescale-replicator``) -> check every message
(``tables``) -> COPY + upsert + last stream sequence in one transaction (``store``) -> ack.

Exactly once: a message is acked only after its transaction committed; a redelivered one
at or below the stored last sequence is already in and is skipped. A batch's transaction
starts as soon as the batch before it is stored, while the runtime still acks that one and
handles the next; batches are stored strictly in order (a batch's sequence marks all before
it as stored). Because later messages may be delivered before a dead process's unacked ones
come back, start-up first catches up with what the previous process was given (stream
sequences above the stored one up to the consumer's last delivered), reading it on a
short-lived consumer, before consuming anew. The stored sequence counts one stream: its
creation time is recorded with it, and a stream made again under the name (numbering from 1
again: its messages would be skipped as stored) stops the start with what to do
(``Misdeployed``); made again while the process runs, it stops the process so, before its
first message is skipped (a message at or below the last sequence stored has the stream
checked again: rare otherwise, a redelivery). Skipping them is silent loss; re-replicating
on its own would keep the old stream's rows beside the new one's, so ops decide.
Bad input is dead-lettered to ``dlq.timescale-replicator`` with its reason; a message that
is skipped is checked again, so a refusal whose dead letter was never published is not lost.
A row the database refuses is found only by its transaction, and dead-lettered after it:
the sequence recorded stops below it, and the next batch is stored only once that dead
letter is out.

In a replay namespace (``TICKWIRE_NAMESPACE``) the rows go to that namespace's own schema
``ns_<name>`` (made on first start, the same tables as ``market``), never to ``market``.

One process runs one runtime ``Worker`` per stream, all sharing one set of metrics; the
first serves /metrics and /healthz on ``TICKWIRE_METRICS_PORT`` (healthy when every stream
is), the others on free loopback ports of their own. Run one process per set of streams:
two processes on one stream's durable would commit out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
from typing import Annotated, Any, Final

import nats.errors
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Gauge
from pydantic import Field, SecretStr, field_validator

from contracts.codec import Codec, ContractError
from contracts.streams import TIMESCALE_REPLICATOR, stream_name
from workers.runtime.errors import Misdeployed, Rejected, ReplayFailed, TransientError
from workers.runtime.metrics import WorkerMetrics
from workers.runtime.pull import AckInfo, read_stream, stream_seq
from workers.runtime.settings import RuntimeSettings, load
from workers.runtime.worker import Batch, Commit, Context, Delivery, Worker, tune_interpreter
from workers.status import consumer_lag
from workers.timescale_replicator.store import Refused, Store
from workers.timescale_replicator.tables import TABLES, Row, Table

log = logging.getLogger(__name__)

NAME: Final = TIMESCALE_REPLICATOR
DB_REFUSED: Final = "db_refused"
CATCH_UP_SUFFIX: Final = "-catchup"


class Settings(RuntimeSettings):
    postgres_dsn: SecretStr
    """DSN of a login role in ``tickwire_replicator`` (hidden in repr and logs)."""
    replicate: str = ",".join(TABLES)
    """Comma-separated streams to replicate (base names: CANDLES,FEATURES,SCORES,SIGNALS)."""
    handler_batch: Annotated[int, Field(ge=1, le=100_000)] = 5000
    """Rows per COPY transaction, at most."""
    fetch_batch: Annotated[int, Field(ge=1, le=10_000)] = 2000
    lag_interval_s: Annotated[float, Field(gt=0)] = 5.0
    postgres_connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    postgres_command_timeout_s: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("replicate")
    @classmethod
    def _known_streams(cls, value: str) -> str:
        names = [n.strip().upper() for n in value.split(",") if n.strip()]
        unknown = [n for n in names if n not in TABLES]
        if unknown or not names:
            raise ValueError(f"want a comma-separated subset of {','.join(TABLES)}: {value!r}")
        return ",".join(dict.fromkeys(names))

    @property
    def streams(self) -> list[str]:
        return self.replicate.split(",")


class Metrics:
    """The replicator's own series, on the registry its workers share."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        r = metrics.registry
        self.rows = Counter(
            "tickwire_replicated_rows",
            "Messages by outcome: upserted, skipped (already stored), superseded (a later"
            " revision in the same batch)",
            ["worker", "stream", "outcome"],
            registry=r,
        )
        self.last_seq = Gauge(
            "tickwire_replicated_last_seq",
            "Last stream sequence committed to PostgreSQL",
            ["worker", "stream"],
            registry=r,
        )
        self.lag_messages = Gauge(
            "tickwire_replication_lag_messages",
            "Messages on the stream not yet committed and acked",
            ["worker", "stream"],
            registry=r,
        )
        self.lag_seconds = Gauge(
            "tickwire_replication_lag_seconds",
            "Stream time between the stream's last message and the last one replicated",
            ["worker", "stream"],
            registry=r,
        )


class Replica:
    """One stream's worker: its table, store, durable and checks."""

    def __init__(self, settings: Settings, table: Table[Any], metrics: Metrics) -> None:
        self.settings = settings
        self.table = table
        self.namespace = settings.namespace
        self.stream = stream_name(table.stream, namespace=settings.namespace)
        self.durable = NAME
        self.codec: Codec[Any] = Codec(table.message)
        self.store = Store(
            settings.postgres_dsn.get_secret_value(),
            table,
            stream=self.stream,
            consumer=self.durable,
            namespace=settings.namespace,
            connect_timeout_s=settings.postgres_connect_timeout_s,
            command_timeout_s=settings.postgres_command_timeout_s,
        )
        name = table.stream
        self._upserted = metrics.rows.labels(NAME, name, "upserted")
        self._skipped = metrics.rows.labels(NAME, name, "skipped")
        self._superseded = metrics.rows.labels(NAME, name, "superseded")
        self._last_seq = metrics.last_seq.labels(NAME, name)
        self.lag_messages = metrics.lag_messages.labels(NAME, name)
        self.lag_seconds = metrics.lag_seconds.labels(NAME, name)
        self._stored: asyncio.Future[bool] | None = None
        """Done once the last batch handled is in the database, whichever way it got there;
        False when the database refused rows of it (``_store_early``)."""
        self._early: set[asyncio.Task[bool]] = set()
        self._through = 0
        """The highest stream sequence handed to the store: a message at or below it is a
        redelivery, or the first of a stream made again under the name (``_check_again``).
        0: nothing stored yet, and the stream may have been made again since the start
        recorded its creation time."""

    # --- a batch -----------------------------------------------------------------------

    async def handle(self, batch: Batch[Any], ctx: Context) -> Commit:
        """Check and shape the rows, and store them as soon as the batch before is stored;
        the commit waits for that, or stores them itself when that try failed."""
        check, row, ns = self.table.check, self.table.row, self.namespace
        skipped = ctx.skipped
        rows: list[tuple[int, Row]] = []
        kept: list[Delivery[Any]] = []  # the deliveries of ``rows``, in the same order
        top = 0
        low = self._through + 1
        for d in batch.items:
            msg = d.msg
            seq = stream_seq(msg.reply)
            if seq > top:
                top = seq
            if seq < low:
                low = seq
            if seq in skipped:  # dead-lettered at start: checking it raised
                continue
            problem = check(d.value, msg.subject, ns)
            if problem is not None:
                batch.reject(d, *problem)
            else:
                rows.append((seq, row(d.value)))
                kept.append(d)
        if low <= self._through or not self._through:
            await self._check_again(ctx)
        if top > self._through:
            self._through = top

        after, stored = self._stored, asyncio.get_running_loop().create_future()
        self._stored = stored
        early = asyncio.create_task(self._store_early(after, stored, rows, top, kept, batch))
        self._early.add(early)
        early.add_done_callback(self._early.discard)

        async def commit() -> None:
            # called once the batch before is finished, so stored and its dead letters
            # out: if the early try failed or waited for that, this batch is stored now
            if not await early:
                stored.set_result(await self._store(rows, top, kept, batch))

        return commit

    async def _store_early(
        self,
        after: asyncio.Future[bool] | None,
        stored: asyncio.Future[bool],
        rows: list[tuple[int, Row]],
        top: int,
        kept: list[Delivery[Any]],
        batch: Batch[Any],
    ) -> bool:
        """Store a batch right after the one before it, without waiting for that one's acks
        or the runtime's turn: a batch's rows are never stored before the earlier batches'
        (its sequence would mark theirs as stored). Nor before the dead letters of rows the
        database refused in the batch before: that one's sequence stops below them until
        they are out. False: this try failed or waited for that, the commit stores the
        batch."""
        if after is not None and not await asyncio.shield(after):
            return False
        try:
            whole = await self._store(rows, top, kept, batch)
        except Exception as exc:  # the commit tries again, and reports what stays wrong
            log.debug("%s: %s batch not stored early: %r", NAME, self.stream, exc)
            return False
        stored.set_result(whole)
        return True

    async def _store(
        self, rows: list[tuple[int, Row]], top: int, kept: list[Delivery[Any]], batch: Batch[Any]
    ) -> bool:
        """One transaction for the batch; the rows the database refuses are rejected. False:
        some were, and the sequence recorded stops below the first of them."""
        try:
            written = await self.store.write(rows, top)
        except Refused as exc:
            log.warning("%s: %s batch refused (%s); storing it row by row", NAME, self.stream, exc)
            written = await self.store.write_each(rows, top)
            for i, why in written.refused:
                batch.reject(kept[i], DB_REFUSED, why)
        self._upserted.inc(written.rows)
        if written.skipped:
            self._skipped.inc(written.skipped)
        superseded = len(rows) - written.skipped - written.rows - len(written.refused)
        if superseded:
            self._superseded.inc(superseded)
        self._last_seq.set(written.last_seq)
        return not written.refused

    async def close(self) -> None:
        """Stop what waits to be stored (batches handed back, stopping) and disconnect."""
        for task in list(self._early):
            task.cancel()
        await asyncio.gather(*self._early, return_exceptions=True)
        await self.store.close()

    # --- start-up ----------------------------------------------------------------------

    async def start(self, ctx: Context) -> None:
        """Database ready, durable present, then what a dead process left behind."""
        await self.store.connect()
        try:
            info = await ctx.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            raise TransientError(
                f"consumer {self.stream}/{self.durable} not found: run `tickwire streams ensure`"
            ) from None
        delivered = info.delivered.stream_seq if info.delivered else 0
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        await self._same_stream(ctx)
        stored = await self.store.last_seq()
        self._last_seq.set(stored)
        if stored < floor:
            # the last batch acked had rows the database refused (dead-lettered; the
            # sequence stops below them until a later batch is stored), or the database
            # lost commits (restored from a backup?)
            log.warning(
                "%s: %s holds up to seq %d but the consumer acked up to %d: unless the rows"
                " after it were refused (see the dead letters), replay %d..%d into it to fill"
                " the gap",
                NAME,
                self.stream,
                stored,
                floor,
                stored + 1,
                floor,
            )
        first = max(floor, stored) + 1
        self._through = max(stored, delivered)
        if first <= delivered:
            count = await self._catch_up(ctx, first, delivered)
            log.info(
                "%s: %s caught up from seq %d to %d (%d messages) before consuming",
                NAME,
                self.stream,
                first,
                delivered,
                count,
            )

    async def _same_stream(self, ctx: Context) -> None:
        """Refuse a stream other than the one the stored sequence counts: made again under
        its name, it numbers its messages from 1 again, and those up to the stored sequence
        would be skipped as stored. Else record its creation time where none is (or nothing is stored yet)."""
        info = await ctx.js.stream_info(self.stream)
        created = info.created
        if created is None:  # a server too old to say: the sequences are all there is
            log.warning("%s: %s has no creation time to check", NAME, self.stream)
        stored = await self.store.stream_state()
        if stored is not None:
            problem = other_stream(
                self.stream, self.store.schema, *stored, created, info.state.last_seq
            )
            if problem is not None:
                raise Misdeployed(f"{problem}; {self._remedy()}")
        if created is not None:
            await self.store.bind_stream(created)

    def _remedy(self) -> str:
        if self.namespace is not None:
            return (
                f"its rows are an earlier replay's: run `tickwire replay delete"
                f" {self.namespace}` with TICKWIRE_POSTGRES_DSN set to the admin's DSN (it"
                f" drops schema {self.store.schema}), then create the replay again"
            )
        return (
            "to replicate this stream from its first message (the rows stored stay, upserted"
            " by revision), run as the admin: DELETE FROM market.replication_state WHERE"
            f" stream = '{self.stream}' AND consumer = '{self.durable}'"
        )

    async def _check_again(self, ctx: Context) -> None:
        """The stream checked again before a message at or below the last sequence stored
        is skipped as stored: rare while running (a redelivery), and the first message of a
        stream deleted and made again under the name, its durable with it, while this one
        ran (``Misdeployed``: nothing of it is acked). Before the first batch stored, too:
        the stream made again since the start is then the one the sequences count."""
        try:
            await self._same_stream(ctx)
        except (nats.errors.Error, TimeoutError) as exc:  # NotFoundError: gone meanwhile
            raise TransientError(f"{self.stream} not checked again: {exc!r}") from exc

    async def _catch_up(self, ctx: Context, first: int, last: int) -> int:
        """Store the valid messages of ``first..last``; the checks' refusals come with the
        redelivery, the database's stop the start (``_write_holding``)."""
        done = 0
        reading = read_stream(
            ctx.nc,
            ctx.js,
            self.stream,
            consumer=self.durable + CATCH_UP_SUFFIX,
            filter_subjects=(),
            first=first,
            last=last,
            desc=f"{NAME}: catching up {self.stream}",
        )
        async with contextlib.aclosing(reading) as batches:  # its consumer gone on a failure
            async for batch in batches:
                read = [(i, m) for i, m in batch if i.stream_seq not in ctx.skipped]
                await self._write_holding(self._rows(read), batch[-1][0].stream_seq, read)
                done += len(batch)
        return done

    def _rows(self, batch: list[tuple[AckInfo, Msg]]) -> list[tuple[int, Row]]:
        out = []
        for info, msg in batch:
            try:
                value = self.codec.decode(msg.data)
            except ContractError:
                continue
            try:
                if self.table.check(value, msg.subject, self.namespace) is None:
                    out.append((info.stream_seq, self.table.row(value)))
            except Exception as exc:  # as the handler would: the start goes on without it
                raise ReplayFailed(msg, info, exc, acked=False) from exc
        return out

    async def _write_holding(
        self, rows: list[tuple[int, Row]], through: int, read: list[tuple[AckInfo, Msg]]
    ) -> None:
        """Catch-up writes. A refused batch goes row by row, its sequence recorded below the
        first row refused, which stops the start (``ReplayFailed``): that row is dead-lettered,
        left out (``Context.skipped``) and the start made again from the stored sequence."""
        try:
            written = await self.store.write(rows, through)
        except Refused:
            written = await self.store.write_each(rows, through)
            if written.refused:
                i, why = written.refused[0]
                info, msg = next((info, msg) for info, msg in read if info.stream_seq == rows[i][0])
                raise ReplayFailed(msg, info, Rejected(DB_REFUSED, why), acked=False) from None
        self._last_seq.set(written.last_seq)

    async def update_lag(self, ctx: Context) -> None:
        lag = await consumer_lag(ctx.js, self.stream, self.durable)
        self.lag_messages.set(lag.messages)
        self.lag_seconds.set(lag.seconds)


def other_stream(
    stream: str,
    schema: str | None,
    stored_seq: int,
    stored_created: dt.datetime | None,
    created: dt.datetime | None,
    last_seq: int,
) -> str | None:
    """Why ``stream`` (created at ``created``, at ``last_seq`` now) is not the stream whose
    sequences were stored (``stored_seq`` of a stream created at ``stored_created``); None
    when nothing says so. A stream's sequences never go back, nor does its creation time
    change."""
    if stored_seq == 0:  # nothing stored: nothing to skip
        return None
    if stored_created is not None and created is not None and stored_created != created:
        now = f"was created {created.isoformat()}"
    elif stored_seq > last_seq:
        now = f"ends at seq {last_seq}"
    else:
        return None
    of = f" of a stream created {stored_created.isoformat()}" if stored_created else ""
    return (
        f"{stream} is not the stream {schema}.replication_state counts: that holds seq"
        f" {stored_seq}{of}, and {stream} {now}"
    )


class _StreamWorker(Worker[Any]):
    """The runtime worker of one stream; the first one answers /healthz for all of them."""

    siblings: list[Worker[Any]]

    def healthy(self) -> bool:
        return all(Worker.healthy(w) for w in getattr(self, "siblings", [self]))


class Replicator:
    """The stream workers of one process, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics(NAME)
        own = Metrics(self.metrics)
        self.replicas = [Replica(settings, TABLES[s], own) for s in settings.streams]
        self.workers: list[_StreamWorker] = []
        for i, replica in enumerate(self.replicas):
            worker = _StreamWorker(
                NAME,
                stream=replica.stream,
                durable=replica.durable,
                codec=replica.codec,
                settings=settings,
                handler=replica.handle,
                in_order=True,
            )
            worker.metrics = self.metrics
            worker.serves_metrics = i == 0  # one port for the process: the first serves all
            worker.on_startup(replica.start)
            worker.on_shutdown(_closer(replica))
            self.workers.append(worker)
        self.workers[0].siblings = list(self.workers)
        self._stopping = asyncio.Event()

    @property
    def lead(self) -> Worker[Any]:
        return self.workers[0]

    def stop(self) -> None:
        self._stopping.set()
        for w in self.workers:
            w.stop()

    async def run(self) -> None:
        """Every stream worker and the lag reporter; one failing stops all."""
        tasks = [asyncio.create_task(w.run(), name=f"{NAME} {w.stream}") for w in self.workers]
        tasks.append(asyncio.create_task(self._report_lag(), name=f"{NAME} lag"))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.stop()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

    async def _report_lag(self) -> None:
        """Every ``lag_interval_s``: messages and seconds behind each stream, on /metrics."""
        interval = self.settings.lag_interval_s
        while not self._stopping.is_set():
            for worker, replica in zip(self.workers, self.replicas, strict=True):
                if not worker.started.is_set():
                    continue
                try:
                    await replica.update_lag(worker.context)
                except Exception as exc:  # lag is a report; a failure must not stop work
                    log.debug("%s: lag of %s not read: %r", NAME, replica.stream, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)


def _closer(replica: Replica) -> Any:
    async def close(_: Context) -> None:
        await replica.close()

    return close


def main() -> int:
    replicator = Replicator(load(Settings))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, replicator.stop)
        tune_interpreter()
        await replicator.run()

    try:
        asyncio.run(run())
    except Misdeployed as exc:
        log.error("%s refuses to start: %s", NAME, exc)
        return 1
    return 0
