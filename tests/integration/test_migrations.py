"""PostgreSQL migrations against a real server, each test in a fresh database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from db.migrate import LOCK_NAME, MigrationError, applied, load_migrations, migrate
from tests.waiting import eventually
from workers.cli import main as tickwire

pytestmark = pytest.mark.integration

# Everything the migrations define in the market schema, as the catalog describes it.
CATALOG_DUMP = """
SELECT 'column', c.relname || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = 'market' AND a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'p', 'v', 'm')
UNION ALL
SELECT 'constraint', conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'market'::regnamespace
UNION ALL
SELECT 'index', schemaname || '.' || indexname, indexdef
FROM pg_indexes WHERE schemaname = 'market'
UNION ALL
SELECT 'migration', version::text, name || ' ' || checksum
FROM public.schema_migrations
ORDER BY 1, 2, 3
"""

CANDLE_COLUMNS = [
    "feed", "symbol", "tf", "open_time", "close_time", "open", "high", "low", "close",
    "tick_volume", "real_volume", "spread_mean", "spread_max", "first_tick_ms", "last_tick_ms",
    "revision", "v",
]  # fmt: skip


async def catalog(dsn: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(row) for row in await conn.fetch(CATALOG_DUMP)]
    finally:
        await conn.close()


async def fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def write(directory: Path, name: str, sql: str) -> None:
    (directory / name).write_text(sql, encoding="utf-8")


async def test_migrations_apply_once_and_a_second_run_changes_nothing(pg_dsn: str) -> None:
    every = [m.name for m in load_migrations()]

    assert await migrate(pg_dsn) == every
    before = await catalog(pg_dsn)
    assert await migrate(pg_dsn) == []
    assert await catalog(pg_dsn) == before
    assert await applied(pg_dsn) == [(m.version, m.name) for m in load_migrations()]

    columns = await fetch(
        pg_dsn,
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'market' AND table_name = 'candles' ORDER BY ordinal_position",
    )
    assert [row["column_name"] for row in columns] == CANDLE_COLUMNS
    key = await fetch(
        pg_dsn,
        "SELECT a.attname FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = 'market.candles'::regclass AND i.indisprimary"
        " ORDER BY array_position(i.indkey, a.attnum)",
    )
    assert [row["attname"] for row in key] == ["feed", "symbol", "tf", "open_time"]
    assert ("constraint", "market.replication_state.replication_state_pkey",
            "PRIMARY KEY (stream, consumer)") in before  # fmt: skip


async def test_replication_state_gets_the_stream_created_column_in_every_namespace_too(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A replay namespace made before the column came gets it with market's table; one made
    after has it from market's."""
    every = load_migrations()
    column = every.index(next(m for m in every if "stream_created" in m.name))
    for m in every[:column]:
        write(tmp_path, m.name, m.sql)
    await migrate(pg_dsn, directory=tmp_path)
    await fetch(pg_dsn, "SELECT market.open_namespace('before')")
    for m in every[column:]:
        write(tmp_path, m.name, m.sql)
    await migrate(pg_dsn, directory=tmp_path)
    await fetch(pg_dsn, "SELECT market.open_namespace('after')")
    rows = await fetch(
        pg_dsn,
        "SELECT table_schema FROM information_schema.columns WHERE table_name ="
        " 'replication_state' AND column_name = 'stream_created' ORDER BY table_schema",
    )
    assert [r["table_schema"] for r in rows] == ["market", "ns_after", "ns_before"]


async def test_candles_refuse_what_no_candle_can_be(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    insert = (
        "INSERT INTO market.candles VALUES ('f', 'EURUSD', $1, to_timestamp(60), to_timestamp($2),"
        " 1.1, $3, 1.0, 1.05, 10, 0, 0.1, 0.2, 60000, 119000, $4, 1)"
    )
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(insert, "M1", 120, 1.2, 0)
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(insert, "M1", 120, 1.2, 1)
        for tf, close, high, revision in [
            ("M2", 120, 1.2, 0),  # no such timeframe
            ("M5", 60, 1.2, 0),  # empty period
            ("M15", 120, 0.9, 0),  # high below low
            ("M30", 120, 1.2, -1),  # negative revision
        ]:
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute(insert, tf, close, high, revision)
    finally:
        await conn.close()


async def test_failing_migration_rolls_back_and_names_its_file(pg_dsn: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_create_kept.sql", "CREATE TABLE public.kept (id int);\n")
    write(
        tmp_path,
        "0002_half_done.sql",
        "CREATE TABLE public.half_done (id int);\nINSERT INTO public.missing VALUES (1);\n",
    )

    with pytest.raises(MigrationError) as failure:
        await migrate(pg_dsn, directory=tmp_path)

    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("0002_half_done.sql line 2: ")
    assert 'relation "public.missing" does not exist' in message
    assert await applied(pg_dsn) == [(1, "0001_create_kept.sql")]
    tables = await fetch(
        pg_dsn,
        "SELECT to_regclass('public.kept')::text AS kept,"
        " to_regclass('public.half_done')::text AS half_done",
    )
    assert dict(tables[0]) == {"kept": "kept", "half_done": None}

    # fixed before it ever applied, it goes in on the next run
    write(tmp_path, "0002_half_done.sql", "CREATE TABLE public.half_done (id int);\n")
    assert await migrate(pg_dsn, directory=tmp_path) == ["0002_half_done.sql"]


async def test_a_file_changed_after_it_was_applied_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_create_a.sql", "CREATE TABLE public.a (id int);\n")
    await migrate(pg_dsn, directory=tmp_path)
    write(tmp_path, "0001_create_a.sql", "CREATE TABLE public.a (id bigint);\n")
    write(tmp_path, "0002_create_b.sql", "CREATE TABLE public.b (id int);\n")

    with pytest.raises(MigrationError, match=r"^0001_create_a\.sql: changed after it was applied"):
        await migrate(pg_dsn, directory=tmp_path)
    assert await applied(pg_dsn) == [(1, "0001_create_a.sql")]


async def test_concurrent_migrators_apply_each_file_exactly_once(pg_dsn: str) -> None:
    every = [m.name for m in load_migrations()]
    holder = await asyncpg.connect(pg_dsn)
    try:
        # Hold the migrators' lock so that both are certainly waiting on it together.
        await holder.execute("SELECT pg_advisory_lock(hashtext($1))", LOCK_NAME)
        both = asyncio.gather(migrate(pg_dsn), migrate(pg_dsn))

        async def two_waiting() -> bool:
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks"
                " WHERE locktype = 'advisory' AND NOT granted AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            return bool(waiting == 2)

        await eventually(two_waiting, what="both migrators waiting on the lock")
        await holder.execute("SELECT pg_advisory_unlock(hashtext($1))", LOCK_NAME)
        results = await both
    finally:
        await holder.close()

    assert sorted(results, key=len) == [[], every]
    rows = await fetch(pg_dsn, "SELECT name FROM public.schema_migrations ORDER BY version")
    assert [row["name"] for row in rows] == every


async def test_no_transaction_file_runs_statement_by_statement(pg_dsn: str, tmp_path: Path) -> None:
    body = (
        "CREATE TABLE IF NOT EXISTS public.t (id int);\n"
        "DO $$ BEGIN IF true THEN PERFORM 1; END IF; END $$;\n"
        "-- CREATE INDEX CONCURRENTLY refuses to run inside a transaction block\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_id ON public.t (id);\n"
    )
    write(tmp_path, "0001_index_t.sql", body)
    with pytest.raises(MigrationError, match="cannot run inside a transaction block"):
        await migrate(pg_dsn, directory=tmp_path)
    assert await applied(pg_dsn) == []

    write(tmp_path, "0001_index_t.sql", "-- tickwire: no-transaction\n" + body)
    assert await migrate(pg_dsn, directory=tmp_path) == ["0001_index_t.sql"]
    index = await fetch(pg_dsn, "SELECT to_regclass('public.t_id')::text AS t_id")
    assert index[0]["t_id"] == "t_id"


def test_cli_migrates_and_lists_status(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    names = [m.name for m in load_migrations()]

    assert tickwire(["db", "status", "--dsn", pg_dsn]) == 0
    assert capsys.readouterr().out.splitlines() == [f"pending  {name}" for name in names]
    assert tickwire(["db", "migrate", "--dsn", pg_dsn]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{len(names)} migration(s) applied"
    assert tickwire(["db", "migrate", "--dsn", pg_dsn]) == 0
    assert capsys.readouterr().out.splitlines() == ["up to date"]
    assert tickwire(["db", "status", "--dsn", pg_dsn]) == 0
    assert capsys.readouterr().out.splitlines() == [f"applied  {name}" for name in names]
