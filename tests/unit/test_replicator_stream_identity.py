"""timescale-replicator's start: is the stream the one whose sequences were stored?"""

from __future__ import annotations

import datetime as dt

import pytest

from workers.timescale_replicator.app import other_stream

MADE = dt.datetime(2026, 3, 3, 21, 50, tzinfo=dt.UTC)
MADE_AGAIN = MADE + dt.timedelta(hours=2)


@pytest.mark.parametrize(
    ("stored_seq", "stored_created", "created", "last_seq"),
    [
        (100, MADE, MADE, 100),  # caught up
        (100, MADE, MADE, 250),  # behind
        (100, None, MADE, 250),  # stored before creation times were: nothing says otherwise
        (100, MADE, None, 250),  # a server that does not say
        (0, MADE, MADE_AGAIN, 0),  # nothing stored, nothing to skip
        (0, MADE, MADE_AGAIN, 40),
    ],
)
def test_the_stream_stored_is_taken(
    stored_seq: int, stored_created: dt.datetime | None, created: dt.datetime | None, last_seq: int
) -> None:
    assert other_stream("CANDLES", "market", stored_seq, stored_created, created, last_seq) is None


@pytest.mark.parametrize(
    ("stored_created", "created", "last_seq", "why"),
    [
        (MADE, MADE_AGAIN, 40, f"CANDLES was created {MADE_AGAIN.isoformat()}"),
        (MADE, MADE_AGAIN, 250, f"CANDLES was created {MADE_AGAIN.isoformat()}"),
        (MADE, MADE, 40, "CANDLES ends at seq 40"),
        (None, MADE_AGAIN, 40, "CANDLES ends at seq 40"),
        (MADE, None, 40, "CANDLES ends at seq 40"),
    ],
)
def test_another_stream_under_the_name_is_refused(
    stored_created: dt.datetime | None, created: dt.datetime | None, last_seq: int, why: str
) -> None:
    problem = other_stream("CANDLES", "market", 100, stored_created, created, last_seq)
    assert problem is not None
    assert "market.replication_state" in problem
    assert "seq 100" in problem
    assert problem.endswith(why)
