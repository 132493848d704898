"""One stream's rows into PostgreSQL: COPY into staging, upsert, last sequence, one commit.

Each replicated stream has its own connection (and so its own temporary staging tables).
``write`` runs one transaction: read the stream's last replicated sequence (locking its
row), drop what it already covers, COPY the rest into staging, upsert it into the market
table (a batch of first revisions is inserted as it is, and upserted only when a key of it
is stored already: ``_merge``), record the batch's last sequence. The caller acks after it
returns.

A database that cannot be reached, restarts, or times out raises ``TransientError`` (the
runtime holds the batch and tries again with backoff; the connection is made again). A
batch the database refuses for its values raises ``Refused``; ``write_each`` then stores
the rows one by one and returns those refused, so one bad row never holds back the others.

The connection lives on a thread of its own, with its own event loop (``_Thread``): the
worker's loop runs long stretches without yielding (decoding, checking and acking thousands
of messages), and a transaction's round trips answered there waited for each stretch to
end, one after the other; on their own thread they wait for the interpreter lock at most.

Live, the tables are those of schema ``market``. In a replay namespace they are those of the
namespace's own schema (``ns_<name>``, made on first connect by ``market.open_namespace``):
the queries name tables without a schema and each connection's ``search_path`` holds only
the one schema it writes, so a namespaced run cannot reach a ``market`` table.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, Final, NamedTuple, TypeVar

import asyncpg

from db.queries import query
from workers.runtime.errors import TransientError
from workers.timescale_replicator.tables import Row, Table, latest, plain_insert

T = TypeVar("T")
log = logging.getLogger(__name__)

LIVE_SCHEMA: Final = "market"

# What the database says of the values themselves (SQLSTATE classes 22 and 23), and what
# the client says when a value cannot be encoded for COPY.
_VALUE_ERRORS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    OverflowError,
    ValueError,
    TypeError,
)


class Refused(Exception):
    """PostgreSQL refused a batch for the values of some row in it."""


class Written(NamedTuple):
    rows: int
    """Rows sent to the upsert (after skipping and collapsing revisions)."""
    skipped: int
    """Messages at or below the stored last sequence: the database has them already."""
    last_seq: int
    refused: tuple[tuple[int, str], ...] = ()
    """``(index in rows, why)`` of the rows the database refused (``write_each`` only)."""


class _Thread:
    """An event loop on a thread of its own: what runs there is not held up by the loop
    of the caller, which awaits it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """``work``'s result, run on the thread (started on first use); cancelling the
        caller cancels it there."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def stop(self) -> None:
        """Cancel what still runs there, then end the thread."""
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join)
        loop.close()


async def _cancel_the_rest() -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Store:
    def __init__(
        self,
        dsn: str,
        table: Table[Any],
        *,
        stream: str,
        consumer: str,
        namespace: str | None = None,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 60.0,
    ) -> None:
        self._dsn = dsn
        self.table = table
        self.stream = stream
        self.consumer = consumer
        self.namespace = namespace
        self.schema: str | None = None
        """The schema written, known once connected."""
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._conn: asyncpg.Connection | None = None
        self._upsert = query(table.upsert_query)
        self._insert = plain_insert(self._upsert)
        self._columns = table.column_names
        self._thread = _Thread(f"{stream} to PostgreSQL")

    async def connect(self) -> None:
        """Connect (and make the staging tables) now rather than at the first write."""
        await self._thread.run(self._connect())

    async def close(self) -> None:
        if not self._thread.running:
            return
        try:
            await self._thread.run(self._close())
        finally:
            await self._thread.stop()

    async def last_seq(self) -> int:
        return await self._thread.run(self._last_seq())

    async def stream_state(self) -> tuple[int, dt.datetime | None] | None:
        """The last sequence stored and the creation time of the stream it counts (None:
        not recorded yet); None when nothing is stored for the stream."""
        return await self._thread.run(self._stream_state())

    async def bind_stream(self, created: dt.datetime) -> None:
        """Record ``created`` as the creation time of the stream the sequences count, where
        none is recorded or nothing is stored yet."""
        await self._thread.run(self._bind_stream(created))

    async def write(self, rows: Sequence[tuple[int, Row]], through_seq: int) -> Written:
        """Store ``(stream_seq, row)`` pairs and ``through_seq`` as the last sequence."""
        return await self._thread.run(self._write(rows, through_seq))

    async def write_each(self, rows: Sequence[tuple[int, Row]], through_seq: int) -> Written:
        """Like ``write``, a row at a time; ``refused`` says which rows were not stored.

        The sequence recorded stops below the first row refused: its dead letter is sent
        after the commit, and until then a redelivery must find it unstored, to be refused
        (and dead-lettered) again. A later write records past it."""
        return await self._thread.run(self._write_each(rows, through_seq))

    # --- on the thread ------------------------------------------------------------------

    async def _connect(self) -> asyncpg.Connection:
        """The open connection, made (with its staging tables) when there is none."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        self._conn = None
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self._connect_timeout_s,
                command_timeout=self._command_timeout_s,
                server_settings={"application_name": f"timescale-replicator {self.stream}"},
            )
        except Exception as exc:
            raise TransientError(f"PostgreSQL not reachable: {_describe(exc)}") from exc
        try:
            schema = LIVE_SCHEMA
            if self.namespace is not None:
                schema = await conn.fetchval(query("replicator_open_namespace"), self.namespace)
            await conn.fetchval(query("replicator_use_schema"), schema)
            self.schema = schema
            await conn.execute(query("replicator_staging"))
            await conn.fetchval(query("replicator_read_state"), self.stream, self.consumer)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
            raise TransientError(f"PostgreSQL not ready: {_describe(exc)}") from exc
        self._conn = conn
        return conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=5)
            except Exception:
                conn.terminate()

    async def _last_seq(self) -> int:
        conn = await self._connect()
        try:
            value = await conn.fetchval(query("replicator_read_state"), self.stream, self.consumer)
        except Exception as exc:
            raise await self._lost(exc) from exc
        return int(value or 0)

    async def _stream_state(self) -> tuple[int, dt.datetime | None] | None:
        conn = await self._connect()
        try:
            row = await conn.fetchrow(query("replicator_read_stream"), self.stream, self.consumer)
        except Exception as exc:
            raise await self._lost(exc) from exc
        return None if row is None else (int(row["last_seq"]), row["stream_created"])

    async def _bind_stream(self, created: dt.datetime) -> None:
        conn = await self._connect()
        try:
            await conn.execute(query("replicator_bind_stream"), self.stream, self.consumer, created)
        except Exception as exc:
            raise await self._lost(exc) from exc

    async def _write(self, rows: Sequence[tuple[int, Row]], through_seq: int) -> Written:
        conn = await self._connect()
        try:
            async with conn.transaction():
                last = await self._locked_last_seq(conn)
                fresh = [row for seq, row in rows if seq > last]
                unique = latest(fresh, self.table.key, self.table.revision)
                if unique:
                    await conn.copy_records_to_table(
                        self.table.staging,
                        records=unique,
                        columns=self._columns,
                        schema_name="pg_temp",
                    )
                    await self._merge(conn, unique)
                if through_seq > last:
                    await self._record(conn, through_seq)
        except _VALUE_ERRORS as exc:
            raise Refused(_describe(exc)) from exc
        except Exception as exc:
            raise await self._lost(exc) from exc
        return Written(len(unique), len(rows) - len(fresh), max(last, through_seq))

    async def _merge(self, conn: asyncpg.Connection, rows: list[Row]) -> None:
        """Staging into the table. Rows of first revisions are new but for a message
        published again (after the duplicate window) or a stream replicated again: they
        are inserted as they are, and only where one is stored already (its key refused,
        in a savepoint) upserted. Rows with later revisions are upserted at once."""
        at = self.table.revision
        if all(row[at] == 0 for row in rows):
            try:
                async with conn.transaction():  # a savepoint
                    await conn.execute(self._insert)
                return
            except asyncpg.UniqueViolationError:
                pass
        await conn.execute(self._upsert)

    async def _write_each(self, rows: Sequence[tuple[int, Row]], through_seq: int) -> Written:
        conn = await self._connect()
        refused: list[tuple[int, str]] = []
        skipped = 0
        try:
            async with conn.transaction():
                last = await self._locked_last_seq(conn)
                for i, (seq, row) in enumerate(rows):
                    if seq <= last:
                        skipped += 1
                        continue
                    try:
                        async with conn.transaction():  # a savepoint per row
                            await conn.execute(query("replicator_clear_staging"))
                            await conn.copy_records_to_table(
                                self.table.staging,
                                records=[row],
                                columns=self._columns,
                                schema_name="pg_temp",
                            )
                            await conn.execute(self._upsert)
                    except _VALUE_ERRORS as exc:
                        refused.append((i, _describe(exc)))
                if refused:
                    through_seq = min(through_seq, rows[refused[0][0]][0] - 1)
                if through_seq > last:
                    await self._record(conn, through_seq)
        except Exception as exc:
            raise await self._lost(exc) from exc
        stored = len(rows) - skipped - len(refused)
        return Written(stored, skipped, max(last, through_seq), tuple(refused))

    async def _locked_last_seq(self, conn: asyncpg.Connection) -> int:
        value = await conn.fetchval(query("replicator_read_state"), self.stream, self.consumer)
        return int(value or 0)

    async def _record(self, conn: asyncpg.Connection, seq: int) -> None:
        await conn.execute(query("replicator_write_state"), self.stream, self.consumer, seq)

    async def _lost(self, exc: BaseException) -> TransientError:
        """The connection's state is unknown after a failure: drop it, retry on a new one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
        return TransientError(f"PostgreSQL write failed: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:500]
