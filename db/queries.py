"""The queries workers run against PostgreSQL, one file each in `db/queries/`.

A query is named by its file (`replicator_upsert_candles.sql` -> `"replicator_upsert_candles"`);
values travel as bind parameters, never as text.
"""

from __future__ import annotations

import functools
from pathlib import Path

QUERIES_DIR = Path(__file__).parent / "queries"


@functools.cache
def query(name: str) -> str:
    """The text of `db/queries/<name>.sql`; FileNotFoundError names a query that does not exist."""
    return (QUERIES_DIR / f"{name}.sql").read_text(encoding="utf-8")
