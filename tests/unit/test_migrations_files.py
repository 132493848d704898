"""The SQL files of db/ and the pure parts of their runners, without a server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from db.migrate import MigrationError, load_migrations, split_statements
from db.questdb import ddl_statements, render, table_name
from workers.cli import main as tickwire


def test_migrations_are_numbered_one_by_one_from_0001() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert all(m.transactional for m in migrations)  # none needs the marker yet


def test_timescaledb_appears_only_inside_execute_strings_guarded_by_its_presence() -> None:
    for migration in load_migrations():
        for _, statement in split_statements(migration.sql):
            code = re.sub(r"(?m)--.*$", "", statement)
            if re.search(r"timescaledb|hypertable|compression", code, re.IGNORECASE):
                assert code.lstrip().startswith("DO $$"), migration.name
                assert re.search(r"IF EXISTS \(SELECT 1 FROM pg_(available_)?extension", code)
                assert "EXECUTE" in code, migration.name


def test_bad_file_names_and_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("SELECT 1;\n")
    (tmp_path / "1_short.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match=r"^1_short\.sql: not a migration file name"):
        load_migrations(tmp_path)
    (tmp_path / "1_short.sql").unlink()
    (tmp_path / "0001_again.sql").write_text("SELECT 1;\n")
    with pytest.raises(MigrationError, match=r"^0001_ok\.sql: version 1 is also 0001_again\.sql"):
        load_migrations(tmp_path)


def test_marker_on_the_first_line_makes_a_file_non_transactional(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("-- tickwire: no-transaction\nSELECT 1;\n")
    (tmp_path / "0002_b.sql").write_text("SELECT 1;\n-- tickwire: no-transaction\n")
    assert [m.transactional for m in load_migrations(tmp_path)] == [False, True]


def test_split_statements_keeps_quoted_text_and_bodies_whole() -> None:
    sql = (
        "-- leading comment; not a statement\n"
        "CREATE TABLE t (a text DEFAULT 'x;y', \"odd;name\" int);\n"
        "DO $$ BEGIN EXECUTE $q$SELECT ';'$q$; PERFORM 1; END $$;\n"
        "/* block; comment */ SELECT $1::int, a$b FROM t;\n"
        ";  -- empty\n"
        "SELECT 'it''s; fine'"
    )
    statements = split_statements(sql)
    assert [text.strip() for _, text in statements] == [
        "-- leading comment; not a statement\n"
        "CREATE TABLE t (a text DEFAULT 'x;y', \"odd;name\" int)",
        "DO $$ BEGIN EXECUTE $q$SELECT ';'$q$; PERFORM 1; END $$",
        "/* block; comment */ SELECT $1::int, a$b FROM t",
        "-- empty\nSELECT 'it''s; fine'",
    ]
    assert all(sql[offset:].startswith(text) for offset, text in statements)


def test_cli_without_a_dsn_says_so_in_one_line_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TICKWIRE_POSTGRES_DSN", raising=False)
    assert tickwire(["db", "migrate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "TICKWIRE_POSTGRES_DSN" in err


def test_questdb_ddl_gets_the_prefix_and_nothing_else_changes() -> None:
    [live] = ddl_statements()
    [replay] = ddl_statements(table_prefix="replay_7f3a_")
    assert "CREATE TABLE IF NOT EXISTS candles (" in live
    assert "CREATE TABLE IF NOT EXISTS replay_7f3a_candles (" in replay
    assert replay.replace("replay_7f3a_candles", "candles") == live
    assert "DEDUP UPSERT KEYS(ts, feed, symbol, tf)" in live


@pytest.mark.parametrize(
    "prefix", ["x; DROP TABLE candles; --", "1st_", "a-b_", "é_", "x" * 121, "a\n"]
)
def test_questdb_table_names_outside_plain_identifiers_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="not a usable QuestDB table name"):
        table_name("candles", table_prefix=prefix)
    with pytest.raises(ValueError, match="not a usable QuestDB table name"):
        render("SELECT * FROM {prefix}candles", table_prefix=prefix)
