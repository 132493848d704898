"""PostgreSQL/TimescaleDB migrations: numbered SQL files in `db/migrations/`, applied in order.

A migration is a file `NNNN_what_it_does.sql`. Each runs in its own transaction together with
its row in `public.schema_migrations`, so it is applied entirely or not at all. A file whose
first line is `-- tickwire: no-transaction` runs statement by statement outside a transaction
(for what PostgreSQL or TimescaleDB refuse inside one, such as CREATE INDEX CONCURRENTLY); such
a file must be idempotent, since a failure part-way leaves the statements before it in place
and the next run repeats the whole file.

A session-level advisory lock makes concurrent migrators take turns: the second one finds
everything applied and does nothing. A file changed after it was applied is refused.

CLI: `tickwire db migrate [--dsn DSN]`, `tickwire db status [--dsn DSN]`; the DSN defaults
to the environment variable TICKWIRE_POSTGRES_DSN.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
DSN_ENV = "TICKWIRE_POSTGRES_DSN"
NO_TRANSACTION_MARKER = "-- tickwire: no-transaction"

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<slug>[a-z0-9_]+)\.sql$")

# The runner's own queries. Fixed text only: values travel as bind parameters.
LOCK_NAME = "tickwire:schema_migrations"  # advisory lock: hashtext(LOCK_NAME)
_TAKE_LOCK = "SELECT pg_advisory_lock(hashtext($1))"
_CREATE_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS public.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_BOOKKEEPING_EXISTS = "SELECT to_regclass('public.schema_migrations') IS NOT NULL"
_SELECT_APPLIED = "SELECT version, name, checksum FROM public.schema_migrations ORDER BY version"
_RECORD_APPLIED = (
    "INSERT INTO public.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
)


class MigrationError(Exception):
    """The database schema could not be brought up to date."""


@dataclass(frozen=True, kw_only=True)
class Migration:
    version: int
    name: str  # the file name, e.g. "0002_create_candles.sql"
    sql: str
    checksum: str  # sha256 of the file's bytes
    transactional: bool


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """Read the migration files of `directory` (default: `db/migrations/`), in version order."""
    directory = MIGRATIONS_DIR if directory is None else directory
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"{path.name}: not a migration file name (want NNNN_what_it_does.sql)"
            )
        version = int(match["version"])
        if version in migrations:
            raise MigrationError(
                f"{path.name}: version {version} is also {migrations[version].name}"
            )
        raw = path.read_bytes()
        sql = raw.decode("utf-8")
        first_line = sql.split("\n", 1)[0].strip()
        migrations[version] = Migration(
            version=version,
            name=path.name,
            sql=sql,
            checksum=hashlib.sha256(raw).hexdigest(),
            transactional=first_line != NO_TRANSACTION_MARKER,
        )
    return [migrations[v] for v in sorted(migrations)]


async def migrate(dsn: str, *, directory: Path | None = None) -> list[str]:
    """Apply the pending migrations; return the names of the files applied by this call."""
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn)
    try:
        # Released when the connection closes, whatever happens below.
        await conn.execute(_TAKE_LOCK, LOCK_NAME)
        await conn.execute(_CREATE_BOOKKEEPING)
        done = {row["version"]: row for row in await conn.fetch(_SELECT_APPLIED)}
        for migration in migrations:
            row = done.get(migration.version)
            if row is None:
                continue
            if row["name"] != migration.name:
                raise MigrationError(
                    f"{migration.name}: version {migration.version} was applied as {row['name']}"
                )
            if row["checksum"] != migration.checksum:
                raise MigrationError(
                    f"{migration.name}: changed after it was applied (checksum "
                    f"{row['checksum'][:12]} applied, {migration.checksum[:12]} on disk); "
                    "add a new migration instead"
                )
        applied_now: list[str] = []
        for migration in migrations:
            if migration.version not in done:
                await _apply(conn, migration)
                applied_now.append(migration.name)
        return applied_now
    finally:
        await conn.close()


async def applied(dsn: str) -> list[tuple[int, str]]:
    """(version, file name) of every applied migration, in version order. Changes nothing."""
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval(_BOOKKEEPING_EXISTS):
            return []
        return [(row["version"], row["name"]) for row in await conn.fetch(_SELECT_APPLIED)]
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    record = (migration.version, migration.name, migration.checksum)
    if migration.transactional:
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(_RECORD_APPLIED, *record)
        except asyncpg.PostgresError as exc:
            raise MigrationError(_describe(migration, exc, offset=0)) from exc
        return
    for offset, statement in split_statements(migration.sql):
        try:
            await conn.execute(statement)
        except asyncpg.PostgresError as exc:
            raise MigrationError(
                _describe(migration, exc, offset=offset) + " (statements before it stay applied)"
            ) from exc
    await conn.execute(_RECORD_APPLIED, *record)


def _describe(migration: Migration, exc: asyncpg.PostgresError, *, offset: int) -> str:
    """One line naming the file, the line when PostgreSQL reports a position, and the error."""
    where = migration.name
    position = getattr(exc, "position", None)
    if position:
        line = migration.sql.count("\n", 0, offset + int(position) - 1) + 1
        where = f"{where} line {line}"
    message = " ".join(str(exc).split())
    return f"{where}: {message} (SQLSTATE {exc.sqlstate})"


# One token of SQL text: quoted strings, quoted identifiers, dollar-quoted bodies and
# comments are kept whole so that a semicolon inside them does not end a statement.
# Backslash escapes of E'...' strings are not understood: write '' in migrations instead.
_SQL_TOKEN = re.compile(
    r"""
      '(?:[^']|'')*'
    | "(?:[^"]|"")*"
    | --[^\n]*
    | /\*.*?\*/
    | \$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?\$(?P=tag)\$
    | ;
    | (?:[^'"\-/$;]|(?<=[A-Za-z0-9_])\$)+
    | .
    """,
    re.DOTALL | re.VERBOSE,
)


def split_statements(sql: str) -> list[tuple[int, str]]:
    """Split SQL text at top-level semicolons into (offset, statement) pairs.

    Statements holding nothing but comments and whitespace are dropped.
    """
    statements: list[tuple[int, str]] = []
    start = 0
    meaningful = False
    for token in _SQL_TOKEN.finditer(sql):
        text = token.group()
        if text == ";":
            if meaningful:
                statements.append((start, sql[start : token.start()]))
            start, meaningful = token.end(), False
        elif not meaningful and text.strip() and not text.startswith(("--", "/*")):
            meaningful = True
    if meaningful:
        statements.append((start, sql[start:]))
    return statements


def run(command: str, dsn: str | None) -> int:
    """`tickwire db migrate|status`: print the outcome, return the process exit code."""
    dsn = dsn or os.environ.get(DSN_ENV)
    if not dsn:
        print(f"tickwire db: no PostgreSQL DSN: pass --dsn or set {DSN_ENV}", file=sys.stderr)
        return 2
    try:
        if command == "migrate":
            names = asyncio.run(migrate(dsn))
            for name in names:
                print(f"applied  {name}")
            print(f"{len(names)} migration(s) applied" if names else "up to date")
        else:
            done = dict(asyncio.run(applied(dsn)))
            for migration in load_migrations():
                state = "applied" if done.pop(migration.version, None) else "pending"
                print(f"{state:<8} {migration.name}")
            for _, name in sorted(done.items()):
                print(f"{'unknown':<8} {name} (applied, no such file here)")
    except MigrationError as exc:
        print(f"tickwire db {command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = " ".join(str(exc).split())
        print(f"tickwire db {command}: {type(exc).__name__}: {message}", file=sys.stderr)
        return 1
    return 0
