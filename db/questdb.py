"""QuestDB tables: DDL files in `db/questdb/`, run over QuestDB's HTTP `/exec` endpoint.

Each file holds one statement (`/exec` runs one per request); files run in name order and
use `CREATE TABLE IF NOT EXISTS`, so applying them again changes nothing. Table names are
written `{prefix}name`: `apply_ddl` replaces `{prefix}` with a prefix such as `replay_7f3a_`
so tests and replays get tables of their own, and checks that every resulting name is a
plain identifier before anything is sent. HTTP has no bind parameters, so that check is
what keeps names out of harm's way; values never go into DDL.

QuestDB applies WAL transactions asynchronously: a write acknowledged over ILP/HTTP is
durable but may not be readable yet. `wait_for_wal` waits until it is.

Everything here blocks (stdlib urllib); from async code call it via `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DDL_DIR = Path(__file__).parent / "questdb"
PREFIX_PLACEHOLDER = "{prefix}"
MAX_TABLE_NAME_LENGTH = 127  # QuestDB's default cairo.max.file.name.length

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREFIXED_TABLE = re.compile(r"\{prefix\}([A-Za-z0-9_]+)")
_WAL_TABLES = "SELECT name, suspended, writerTxn, sequencerTxn, errorMessage FROM wal_tables()"


class QuestDBError(Exception):
    """QuestDB refused a request or could not be reached."""


def table_name(base: str, *, table_prefix: str = "") -> str:
    """The name of table `base` under `table_prefix`; ValueError unless a plain identifier."""
    name = table_prefix + base
    if not _IDENTIFIER.fullmatch(name) or len(name) > MAX_TABLE_NAME_LENGTH:
        raise ValueError(
            f"not a usable QuestDB table name: {name!r} (want [A-Za-z_][A-Za-z0-9_]*, "
            f"at most {MAX_TABLE_NAME_LENGTH} characters)"
        )
    return name


def ddl_statements(*, table_prefix: str = "", directory: Path | None = None) -> list[str]:
    """The DDL statements of `directory` (default `db/questdb/`) with `{prefix}` replaced."""
    directory = DDL_DIR if directory is None else directory
    return [
        render(path.read_text(encoding="utf-8"), table_prefix=table_prefix)
        for path in sorted(directory.glob("*.sql"))
    ]


def render(sql: str, *, table_prefix: str = "") -> str:
    """`sql` with every `{prefix}name` replaced by `table_name(name, table_prefix=...)`."""
    return _PREFIXED_TABLE.sub(lambda m: table_name(m[1], table_prefix=table_prefix), sql)


def apply_ddl(http_url: str, *, table_prefix: str = "", timeout: float = 10.0) -> None:
    """Create the QuestDB tables (under `table_prefix`) that do not exist yet."""
    for statement in ddl_statements(table_prefix=table_prefix):
        _exec(http_url, statement, timeout=timeout)


def namespace_prefix(namespace: str | None) -> str:
    """The table prefix of a replay namespace's tables; none for live."""
    return "" if namespace is None else f"ns_{namespace.replace('-', '_')}_"


def drop_tables(http_url: str, *, table_prefix: str, timeout: float = 10.0) -> list[str]:
    """Drop every table of the DDL files under `table_prefix` (a replay's); returns their
    names. Tables without a prefix are live and never dropped here."""
    if not table_prefix:
        raise ValueError("drop_tables needs a table prefix: live tables are not dropped")
    names = []
    for path in sorted(DDL_DIR.glob("*.sql")):
        for base in _PREFIXED_TABLE.findall(path.read_text(encoding="utf-8")):
            name = table_name(base, table_prefix=table_prefix)
            _exec(http_url, f"DROP TABLE IF EXISTS {name}", timeout=timeout)
            names.append(name)
    return names


def query(
    http_url: str, sql: str, *, table_prefix: str = "", timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Run one statement; return its rows as dicts of column name to JSON value.

    Table names may be written `{prefix}name`, as in the DDL files, e.g.
    `query(url, "SELECT * FROM {prefix}candles", table_prefix="replay_7f3a_")`.
    Values are as QuestDB's JSON has them: TIMESTAMP as ISO-8601 text
    ("2024-01-02T03:04:00.000000Z"), SYMBOL as text, LONG and INT as int, DOUBLE as float.
    """
    reply = _exec(http_url, render(sql, table_prefix=table_prefix), timeout=timeout)
    names = [column["name"] for column in reply.get("columns", [])]
    return [dict(zip(names, row, strict=True)) for row in reply.get("dataset", [])]


def wait_for_wal(http_url: str, table: str, *, timeout: float = 30.0) -> None:
    """Block until `table` has applied every WAL transaction committed so far.

    Raises QuestDBError if the table is not a WAL table or its WAL apply is suspended, and
    TimeoutError if it has not caught up within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        row = next((r for r in query(http_url, _WAL_TABLES) if r["name"] == table), None)
        if row is None:
            raise QuestDBError(f"{table}: no such WAL table")
        if row["suspended"]:
            raise QuestDBError(f"{table}: WAL apply suspended: {row['errorMessage']}")
        if row["writerTxn"] >= row["sequencerTxn"]:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{table}: WAL applied up to transaction {row['writerTxn']} of "
                f"{row['sequencerTxn']} after {timeout}s"
            )
        time.sleep(0.05)


def _exec(http_url: str, sql: str, *, timeout: float) -> dict[str, Any]:
    url = http_url.rstrip("/") + "/exec?" + urllib.parse.urlencode({"query": sql})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            reply: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:
        raise QuestDBError(_refusal(sql, exc)) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise QuestDBError(f"QuestDB at {http_url} unreachable: {exc}") from exc
    if "error" in reply:  # defensive: QuestDB reports errors with HTTP 400
        raise QuestDBError(f"QuestDB refused {_head(sql)}: {reply['error']}")
    return reply


def _refusal(sql: str, exc: urllib.error.HTTPError) -> str:
    body = exc.read().decode("utf-8", "replace")
    try:
        reply = json.loads(body)
        error = reply["error"]
    except (ValueError, KeyError, TypeError):
        return f"QuestDB refused {_head(sql)}: HTTP {exc.code}: {' '.join(body.split())[:200]}"
    position = reply.get("position")
    at = f" at position {position}" if position is not None else ""
    return f"QuestDB refused {_head(sql)}{at}: {error}"


def _head(sql: str) -> str:
    """The statement's first words, without its leading comments, for error messages."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    words = " ".join(" ".join(lines).split())
    return repr(words if len(words) <= 60 else words[:57] + "...")
