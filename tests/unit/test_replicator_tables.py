"""timescale-replicator's pure part: which messages it refuses, and one row per key."""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgspec
import pytest

from contracts import subjects
from contracts.messages import Candle, FeatureVector, Score, Side, Signal, Timeframe
from workers.runtime.pull import deliveries, delivery, parse_reply, position, stream_seq
from workers.timescale_replicator.app import Settings
from workers.timescale_replicator.tables import (
    CANDLE_TABLE,
    FEATURE_TABLE,
    SCORE_TABLE,
    SIGNAL_TABLE,
    TABLES,
    latest,
)

T0 = 1_741_038_600_000
CANDLE = Candle(
    feed="feed-a", symbol="US500.cash", tf=Timeframe.M5, open_time_ms=T0, close_time_ms=T0 + 300_000,
    open=5000.5, high=5010.25, low=4990.0, close=5001.0, tick_volume=120, first_tick_ms=T0 + 10,
    last_tick_ms=T0 + 299_000, revision=1,
)  # fmt: skip
FEATURES = FeatureVector(
    feed="feed-a", symbol="US500.cash", tf=Timeframe.M5, open_time_ms=T0, candle_revision=1,
    close=5001.0, close_time_ms=T0 + 300_000, last_tick_ms=T0 + 299_000, feature_set_id="fs-1", values=[0.5, -1.25],
)  # fmt: skip
SCORE = Score(
    feed="feed-a", symbol="US500.cash", tf=Timeframe.M5, open_time_ms=T0, candle_revision=1,
    close=5001.0, close_time_ms=T0 + 300_000, last_tick_ms=T0 + 299_000, feature_set_id="fs-1", model_version="m-7", probabilities=[0.2, 0.3, 0.5], score=0.3,
)  # fmt: skip
SIGNAL = Signal(
    signal_id="feed-a|US500.cash|M5|1741038600000|m-7", feed="feed-a", symbol="US500.cash",
    tf=Timeframe.M5, open_time_ms=T0, candle_revision=1, side=Side.BUY, strength=0.3,
    ref_price=5001.0, expires_ms=T0 + 600_000, model_version="m-7", feature_set_id="fs-1",
)  # fmt: skip


def subject_of(m: Any, namespace: str | None = None) -> str:
    build = {Candle: subjects.candles, FeatureVector: subjects.features,
             Score: subjects.scores, Signal: subjects.signals}[type(m)]  # fmt: skip
    return build(m.feed, m.symbol, m.tf, namespace=namespace)


def table_of(m: Any) -> Any:
    return {Candle: CANDLE_TABLE, FeatureVector: FEATURE_TABLE, Score: SCORE_TABLE,
            Signal: SIGNAL_TABLE}[type(m)]  # fmt: skip


@pytest.mark.parametrize("message", [CANDLE, FEATURES, SCORE, SIGNAL])
def test_good_messages_pass_and_their_rows_follow_the_staging_columns(message: Any) -> None:
    table = table_of(message)
    assert table.check(message, subject_of(message), None) is None
    assert table.check(message, subject_of(message, "replay1"), "replay1") is None
    row = table.row(message)
    assert len(row) == len(table.column_names)
    plain = msgspec.to_builtins(message)
    for name, value in zip(table.column_names, row, strict=True):
        assert value == plain[name], name


def test_the_longest_ids_the_pipeline_makes_are_stored() -> None:
    """A 32-character feed, a 64-character symbol and a 128-character model version: the
    signal id of a rebuilt correction is well over 128 characters, and legal."""
    from workers.rebuild.plan import rebuild_id
    from workers.signal_publisher.policy import signal_id

    feed, symbol, model = "f" * 32, "S" * 64, "m" * 128
    score = msgspec.structs.replace(SCORE, feed=feed, symbol=symbol, model_version=model)
    sid = rebuild_id(f"{signal_id(score)}|r12@{T0}", 3)
    assert len(sid) > 256
    long = msgspec.structs.replace(
        SIGNAL, feed=feed, symbol=symbol, model_version=model, signal_id=sid, corrects=sid
    )
    assert SIGNAL_TABLE.check(long, subject_of(long), None) is None


@pytest.mark.parametrize(
    ("message", "reason", "says"),
    [
        (msgspec.structs.replace(CANDLE, low=5002.0), "out_of_range", "not a bar"),
        (msgspec.structs.replace(CANDLE, close=5011.0), "out_of_range", "not a bar"),
        (msgspec.structs.replace(CANDLE, close_time_ms=T0), "out_of_range", "close_time_ms"),
        (msgspec.structs.replace(CANDLE, open_time_ms=4_102_444_800_001), "out_of_range", "2100"),
        (msgspec.structs.replace(CANDLE, revision=2**31), "out_of_range", "revision"),
        (msgspec.structs.replace(CANDLE, tick_volume=2**63), "out_of_range", "tick_volume"),
        (msgspec.structs.replace(FEATURES, values=[]), "out_of_range", "values is empty"),
        (msgspec.structs.replace(FEATURES, feature_set_id=""), "illegal_id", "feature_set_id"),
        (msgspec.structs.replace(FEATURES, feature_set_id="a\x00b"), "illegal_id", "feature_set_id"),
        (msgspec.structs.replace(SCORE, score=-1.01), "out_of_range", "score"),
        (msgspec.structs.replace(SCORE, probabilities=[1.5]), "out_of_range", "probabilities[0]"),
        (msgspec.structs.replace(SCORE, model_version="m" * 129), "illegal_id", "model_version"),
        (msgspec.structs.replace(SIGNAL, ref_price=0.0), "out_of_range", "ref_price"),
        (msgspec.structs.replace(SIGNAL, expires_ms=T0 - 1), "out_of_range", "expires_ms"),
        (msgspec.structs.replace(SIGNAL, corrects="x\ny"), "illegal_id", "corrects"),
        (msgspec.structs.replace(SIGNAL, signal_id="s" * 513), "illegal_id", "signal_id"),
    ],
)  # fmt: skip
def test_values_the_database_would_refuse_are_refused_first(
    message: Any, reason: str, says: str
) -> None:
    problem = table_of(message).check(message, subject_of(message), None)
    assert problem is not None
    assert problem[0] == reason
    assert says in problem[1]


@pytest.mark.parametrize(
    ("field", "highest"),
    [
        ("close_time_ms", 4_102_444_800_000),  # 2100-01-01 UTC
        ("first_tick_ms", 2**63 - 1),  # bigint
        ("last_tick_ms", 2**63 - 1),
        ("tick_volume", 2**63 - 1),
        ("revision", 2**31 - 1),  # integer
    ],
)
def test_a_candle_is_refused_just_past_each_limit_and_not_at_it(field: str, highest: int) -> None:
    at = msgspec.structs.replace(CANDLE, **{field: highest})
    assert CANDLE_TABLE.check(at, subject_of(at), None) is None
    past = msgspec.structs.replace(CANDLE, **{field: highest + 1})
    problem = CANDLE_TABLE.check(past, subject_of(past), None)
    assert problem is not None
    assert problem[0] == "out_of_range"
    assert field in problem[1]


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"low": 5000.5}, False),  # low == open: a bar
        ({"high": 5001.0}, False),  # high == close
        ({"low": 5000.5, "high": 5000.5, "close": 5000.5}, False),  # one price
        ({"low": 0.0, "open": 0.0}, True),  # prices are positive
        ({"close_time_ms": T0 + 1}, False),
        ({"close_time_ms": T0}, True),
    ],
)
def test_a_candle_at_the_edges_of_a_bar(change: dict[str, Any], refused: bool) -> None:
    candle = msgspec.structs.replace(CANDLE, **change)
    problem = CANDLE_TABLE.check(candle, subject_of(candle), None)
    assert (problem is not None) == refused, problem
    if refused:
        assert problem is not None
        assert problem[0] == "out_of_range"


def test_a_message_must_come_on_its_own_subject() -> None:
    other_tf = subjects.candles(CANDLE.feed, CANDLE.symbol, Timeframe.H1)
    assert CANDLE_TABLE.check(CANDLE, other_tf, None)[0] == "subject_mismatch"
    live_in_replay = subject_of(CANDLE)
    assert CANDLE_TABLE.check(CANDLE, live_in_replay, "replay1")[0] == "subject_mismatch"
    control = msgspec.structs.replace(CANDLE, symbol="EUR\tUSD")
    assert CANDLE_TABLE.check(control, subject_of(CANDLE), None)[0] == "illegal_symbol"


def test_latest_keeps_the_highest_revision_and_the_later_of_equals() -> None:
    rng = random.Random(3)
    rows = [(rng.choice("ab"), rng.choice("xy"), rng.randrange(3), n) for n in range(500)]
    got = latest(rows, key=2, revision=2)
    # brute force: per key, the row no other row of the key beats on (revision, position)
    want = []
    for k, group in itertools.groupby(sorted(rows, key=lambda r: r[:2]), key=lambda r: r[:2]):
        want.append(max(group, key=lambda r: (r[2], r[3])))
        assert k == want[-1][:2]
    assert sorted(got) == sorted(want)


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.CANDLES.timescale-replicator.3.1048577.1048000.1741038600000000000.42",
        "$JS.ACK.hub.ACCHASH.CANDLES.timescale-replicator.3.1048577.1048000.1741038600000000000.42",
        "$JS.ACK.hub.ACCHASH.CANDLES.timescale-replicator.3.1048577.1048000.1741038600000000000.42.x7",
    ],
)
def test_the_stream_sequence_is_read_from_either_form_of_ack_subject(reply: str) -> None:
    assert stream_seq(reply) == parse_reply(reply).stream_seq == 1048577
    assert deliveries(reply) == parse_reply(reply).deliveries == 3
    info = parse_reply(reply)
    assert position(reply) == (info.stream_seq, info.timestamp_ns) == (1048577, 1741038600000000000)
    assert delivery(reply) == (3, 1048577, 1741038600000000000)


def test_a_subject_that_is_no_ack_subject_has_no_stream_sequence() -> None:
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        stream_seq("ns.x.candles.feed-a.EURUSD.M1")
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        deliveries("ns.x.candles.feed-a.EURUSD.M1")
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        position("ns.x.candles.feed-a.EURUSD.M1")
    with pytest.raises(ValueError, match="not a JetStream ack subject"):
        delivery("ns.x.candles.feed-a.EURUSD.M1")


def test_settings_choose_streams_and_refuse_unknown_ones() -> None:
    dsn = "postgresql://replicator:secret@db/tickwire"
    s = Settings(postgres_dsn=dsn, replicate=" candles, SIGNALS,candles")
    assert s.streams == ["CANDLES", "SIGNALS"]
    assert Settings(postgres_dsn=dsn).streams == list(TABLES)
    assert "secret" not in repr(s)
    with pytest.raises(ValueError, match="subset of CANDLES,FEATURES,SCORES,SIGNALS"):
        Settings(postgres_dsn=dsn, replicate="CANDLES,TICKS")
