"""Contract messages: exact round trips, refusal reasons, immutability; stream specs as data.

Expected values are written out literally here, never produced by the code under test.
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import msgspec
import pytest

from contracts import streams, subjects
from contracts.codec import (
    INVALID_VALUE,
    MALFORMED_JSON,
    MISSING_FIELD,
    OVERSIZED,
    REASONS,
    UNKNOWN_SCHEMA_VERSION,
    UNKNOWN_TYPE,
    Codec,
    ContractError,
    encode,
)
from contracts.messages import (
    ALL_MESSAGES,
    Bar,
    Candle,
    DeadLetter,
    FeatureVector,
    Score,
    Side,
    Signal,
    Tick,
    TickBatch,
    TickInput,
    TickRow,
    Timeframe,
    Watermark,
)

# --- canonical payloads and the structs they stand for --------------------------------

TICK_JSON = (
    b'{"type":"tick","v":1,"feed":"icm-live","symbol":"US500.cash","time_ms":1767225600123,'
    b'"bid":6012.25,"ask":6012.75,"last":null,"volume":null,"seq":42,"flags":6}'
)
TICK = Tick(
    feed="icm-live",
    symbol="US500.cash",
    time_ms=1767225600123,
    bid=6012.25,
    ask=6012.75,
    seq=42,
    flags=6,
)

TICK_BATCH_JSON = (
    b'{"type":"tick_batch","v":1,"feed":"icm-live","symbol":"EURUSD","ticks":['
    b'{"time_ms":1767225600000,"bid":1.0842,"ask":1.08423,"last":null,"volume":null,'
    b'"seq":1,"flags":6},'
    b'{"time_ms":1767225600250,"bid":1.08421,"ask":1.08424,"last":1.08422,"volume":2.5,'
    b'"seq":2,"flags":2}]}'
)
TICK_BATCH = TickBatch(
    feed="icm-live",
    symbol="EURUSD",
    ticks=[
        TickRow(time_ms=1767225600000, bid=1.0842, ask=1.08423, seq=1, flags=6),
        TickRow(
            time_ms=1767225600250,
            bid=1.08421,
            ask=1.08424,
            last=1.08422,
            volume=2.5,
            seq=2,
            flags=2,
        ),
    ],
)

BAR_JSON = (
    b'{"type":"bar","v":1,"feed":"pepper","symbol":"XAUUSD","tf":"H1",'
    b'"open_time_ms":1767222000000,"open":2650.12,"high":2655.9,"low":2648.01,'
    b'"close":2653.37,"tick_volume":5321,"real_volume":0.0,"spread":0.25}'
)
BAR = Bar(
    feed="pepper",
    symbol="XAUUSD",
    tf=Timeframe.H1,
    open_time_ms=1767222000000,
    open=2650.12,
    high=2655.9,
    low=2648.01,
    close=2653.37,
    tick_volume=5321,
    spread=0.25,
)

CANDLE_JSON = (
    b'{"type":"candle","v":1,"feed":"icm-live","symbol":"GER40*","tf":"M5",'
    b'"open_time_ms":1767225600000,"close_time_ms":1767225900000,"open":20112.4,'
    b'"high":20120.9,"low":20101.1,"close":20118.6,"tick_volume":812,"real_volume":0.0,'
    b'"spread_mean":1.2345678901234567,"spread_max":2.5,"first_tick_ms":1767225600017,'
    b'"last_tick_ms":1767225899981,"revision":1,"source":"ticks"}'
)
CANDLE = Candle(
    feed="icm-live",
    symbol="GER40*",
    tf=Timeframe.M5,
    open_time_ms=1767225600000,
    close_time_ms=1767225900000,
    open=20112.4,
    high=20120.9,
    low=20101.1,
    close=20118.6,
    tick_volume=812,
    spread_mean=1.2345678901234567,
    spread_max=2.5,
    first_tick_ms=1767225600017,
    last_tick_ms=1767225899981,
    revision=1,
)

FEATURES_JSON = (
    b'{"type":"features","v":1,"feed":"icm-live","symbol":"EURUSD","tf":"M1",'
    b'"open_time_ms":1767225600000,"candle_revision":0,"close":1.2345,'
    b'"close_time_ms":1767225660000,"last_tick_ms":1767225659873,"feature_set_id":"fs-2026.1",'
    b'"values":[0.30000000000000004,-1e-8,123456.789,0.0],"warming_up":false,'
    b'"rebuild":0}'
)
FEATURES = FeatureVector(
    feed="icm-live",
    symbol="EURUSD",
    tf=Timeframe.M1,
    open_time_ms=1767225600000,
    candle_revision=0,
    close=1.2345,
    close_time_ms=1767225660000,
    last_tick_ms=1767225659873,
    feature_set_id="fs-2026.1",
    values=[0.30000000000000004, -1e-8, 123456.789, 0.0],
)

SCORE_JSON = (
    b'{"type":"score","v":1,"feed":"icm-live","symbol":"EURUSD","tf":"M1",'
    b'"open_time_ms":1767225600000,"candle_revision":0,"close":1.2345,'
    b'"close_time_ms":1767225660000,"last_tick_ms":1767225659873,"feature_set_id":"fs-2026.1",'
    b'"model_version":"lgbm-20260101-01","probabilities":[0.125,0.5,0.375],"score":0.25,'
    b'"rebuild":0}'
)
SCORE = Score(
    feed="icm-live",
    symbol="EURUSD",
    tf=Timeframe.M1,
    open_time_ms=1767225600000,
    candle_revision=0,
    close=1.2345,
    close_time_ms=1767225660000,
    last_tick_ms=1767225659873,
    feature_set_id="fs-2026.1",
    model_version="lgbm-20260101-01",
    probabilities=[0.125, 0.5, 0.375],
    score=0.25,
)

SIGNAL_JSON = (
    b'{"type":"signal","v":1,"signal_id":"icm-live|EURUSD|M1|1767225600000|lgbm-20260101-01",'
    b'"feed":"icm-live","symbol":"EURUSD","tf":"M1","open_time_ms":1767225600000,'
    b'"candle_revision":0,"side":"BUY","strength":0.75,"ref_price":1.23456,'
    b'"expires_ms":1767225720000,"model_version":"lgbm-20260101-01",'
    b'"feature_set_id":"fs-2026.1","corrects":null,"rebuild":0}'
)
SIGNAL = Signal(
    signal_id="icm-live|EURUSD|M1|1767225600000|lgbm-20260101-01",
    feed="icm-live",
    symbol="EURUSD",
    tf=Timeframe.M1,
    open_time_ms=1767225600000,
    candle_revision=0,
    side=Side.BUY,
    strength=0.75,
    ref_price=1.23456,
    expires_ms=1767225720000,
    model_version="lgbm-20260101-01",
    feature_set_id="fs-2026.1",
)

# payload b'{"bid":NaN}' in base64
DEAD_LETTER_JSON = (
    b'{"type":"dead_letter","v":1,"worker":"candle-ingest","reason":"malformed_json",'
    b'"detail":"JSON is malformed: invalid character (byte 7)","subject":"ticks.icm-live.EURUSD",'
    b'"payload":"eyJiaWQiOk5hTn0=","headers":{"Nats-Msg-Id":"icm-live|EURUSD|7"},'
    b'"stream":"TICKS","stream_seq":1234,"deliveries":1,"failed_at_ms":1767225600999}'
)
DEAD_LETTER = DeadLetter(
    worker="candle-ingest",
    reason="malformed_json",
    detail="JSON is malformed: invalid character (byte 7)",
    subject="ticks.icm-live.EURUSD",
    payload=b'{"bid":NaN}',
    headers={"Nats-Msg-Id": "icm-live|EURUSD|7"},
    stream="TICKS",
    stream_seq=1234,
    deliveries=1,
    failed_at_ms=1767225600999,
)

WATERMARK_JSON = (
    b'{"type":"watermark","v":1,"feed":"icm-live","symbol":"US500.cash","time_ms":1767225660000}'
)
WATERMARK = Watermark(feed="icm-live", symbol="US500.cash", time_ms=1767225660000)

CANONICAL: list[tuple[bytes, Any]] = [
    (TICK_JSON, TICK),
    (TICK_BATCH_JSON, TICK_BATCH),
    (BAR_JSON, BAR),
    (WATERMARK_JSON, WATERMARK),
    (CANDLE_JSON, CANDLE),
    (FEATURES_JSON, FEATURES),
    (SCORE_JSON, SCORE),
    (SIGNAL_JSON, SIGNAL),
    (DEAD_LETTER_JSON, DEAD_LETTER),
]
IDS = [type(message).__name__ for _, message in CANONICAL]


def test_every_message_type_has_a_canonical_example() -> None:
    assert {type(message) for _, message in CANONICAL} == set(ALL_MESSAGES)


@pytest.mark.parametrize(("payload", "expected"), CANONICAL, ids=IDS)
def test_canonical_bytes_decode_to_the_message_and_encode_back_byte_identical(
    payload: bytes, expected: Any
) -> None:
    decoded = Codec(type(expected)).decode(payload)
    assert decoded == expected
    assert encode(decoded) == payload


@pytest.mark.parametrize(("payload", "expected"), CANONICAL, ids=IDS)
def test_message_encodes_to_canonical_bytes_and_decodes_equal(
    payload: bytes, expected: Any
) -> None:
    assert encode(expected) == payload
    assert Codec(type(expected)).decode(encode(expected)) == expected


@pytest.mark.parametrize(
    ("payload", "expected"), [(TICK_JSON, TICK), (TICK_BATCH_JSON, TICK_BATCH), (BAR_JSON, BAR)]
)
def test_the_ticks_union_picks_the_type_by_tag(payload: bytes, expected: Any) -> None:
    decoded = Codec[TickInput](TickInput).decode(payload)
    assert type(decoded) is type(expected)
    assert decoded == expected


def test_field_order_and_whitespace_of_the_input_do_not_matter_but_output_is_canonical() -> None:
    shuffled = (
        b'{ "ask": 6012.75, "flags": 6, "seq": 42, "bid": 6012.25, "time_ms": 1767225600123,\n'
        b'  "symbol": "US500.cash", "feed": "icm-live", "type": "tick" }'
    )
    decoded = Codec(Tick).decode(shuffled)
    assert decoded == TICK
    assert encode(decoded) == TICK_JSON


# --- prices survive exactly -----------------------------------------------------------

# (text the terminal sends, the double it means); the text is the shortest round-trip form.
PRICES = [
    ("1.23456", 1.23456),
    ("0.30000000000000004", 0.1 + 0.2),
    ("1e-8", 1e-8),
    ("123456.789", 123456.789),
    ("1.1", 1.1),
    ("2.675", 2.675),
    ("0.00001", 0.00001),
    ("99999.99999", 99999.99999),
    ("1.7976931348623157e308", 1.7976931348623157e308),
    ("5e-324", 5e-324),
]


@pytest.mark.parametrize(("text", "value"), PRICES, ids=[t for t, _ in PRICES])
def test_price_decodes_to_the_same_double_and_encodes_to_the_same_text(
    text: str, value: float
) -> None:
    payload = (
        '{"type":"tick","v":1,"feed":"icm","symbol":"EURUSD","time_ms":1767225600000,'
        f'"bid":{text},"ask":{text},"last":{text},"volume":null,"seq":null,"flags":0}}'
    ).encode()
    tick = Codec(Tick).decode(payload)
    assert _bits(tick.bid) == _bits(value) == _bits(float(text))
    assert _bits(tick.last or 0.0) == _bits(value)
    assert encode(tick) == payload


def test_random_doubles_round_trip_bit_for_bit() -> None:
    rng = random.Random(20260101)
    codec = Codec(Candle)
    for _ in range(2000):
        # random bit patterns cover every exponent; keep finite, positive values
        price = abs(struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0])
        if not math.isfinite(price):
            continue
        candle = msgspec.structs.replace(CANDLE, open=price, high=price, low=price, close=price)
        payload = encode(candle)
        again = codec.decode(payload)
        assert _bits(again.open) == _bits(price)
        assert encode(again) == payload
        # the text is a JSON number any reader parses to the same double
        assert _bits(json.loads(payload)["close"]) == _bits(price)


def _bits(x: float) -> int:
    return int.from_bytes(struct.pack("<d", x), "little")


# --- refusals, each with its machine-readable reason ----------------------------------

GOOD_TICK = (
    '{"type":"tick","feed":"icm","symbol":"EURUSD","time_ms":1767225600000,'
    '"bid":1.0842,"ask":1.08423}'
)

REFUSALS = [
    # an EA cut off mid-write
    pytest.param(GOOD_TICK[:60].encode(), MALFORMED_JSON, id="truncated"),
    pytest.param(b"", MALFORMED_JSON, id="empty"),
    # MQL5's DoubleToString of an invalid price
    pytest.param(GOOD_TICK.replace('"bid":1.0842', '"bid":nan').encode(), MALFORMED_JSON, id="nan"),
    pytest.param(b"\xff\xfe" + GOOD_TICK.encode("utf-16-le"), MALFORMED_JSON, id="utf16"),
    pytest.param((GOOD_TICK + GOOD_TICK).encode(), MALFORMED_JSON, id="two-objects"),
    # an EA built against a newer contract: new field, v=2
    pytest.param(
        GOOD_TICK.replace("{", '{"v":2,"book_depth":[[1.0841,5.0]],', 1).encode(),
        UNKNOWN_SCHEMA_VERSION,
        id="v2-with-new-field",
    ),
    # v=2 that also changed a type: the version explains it, not the type error
    pytest.param(
        GOOD_TICK.replace("{", '{"v":2,', 1)
        .replace("1767225600000", '"2026-01-01T00:00:00Z"')
        .encode(),
        UNKNOWN_SCHEMA_VERSION,
        id="v2-with-changed-type",
    ),
    pytest.param(GOOD_TICK.replace("{", '{"v":0,', 1).encode(), UNKNOWN_SCHEMA_VERSION, id="v0"),
    pytest.param(GOOD_TICK.replace(',"ask":1.08423', "").encode(), MISSING_FIELD, id="no-ask"),
    pytest.param(GOOD_TICK.replace('"feed":"icm",', "").encode(), MISSING_FIELD, id="no-feed"),
    pytest.param(GOOD_TICK.replace('"tick"', '"quote"').encode(), UNKNOWN_TYPE, id="unknown-tag"),
    pytest.param(GOOD_TICK.replace('"tick"', "7").encode(), UNKNOWN_TYPE, id="numeric-tag"),
    pytest.param(
        GOOD_TICK.replace('"bid":1.0842', '"bid":"1.0842"').encode(),
        INVALID_VALUE,
        id="price-as-string",
    ),
    pytest.param(
        GOOD_TICK.replace("1767225600000", "1767225600000.5").encode(),
        INVALID_VALUE,
        id="fractional-ms",
    ),
    pytest.param(
        GOOD_TICK.replace("1767225600000", "-1").encode(), INVALID_VALUE, id="negative-time"
    ),
    pytest.param(
        GOOD_TICK.replace('"icm"', '"icm.live"').encode(), INVALID_VALUE, id="feed-with-dot"
    ),
    pytest.param(
        GOOD_TICK.replace('"icm"', '"icm\\n"').encode(), INVALID_VALUE, id="feed-with-newline"
    ),
    pytest.param(GOOD_TICK.replace('"EURUSD"', '""').encode(), INVALID_VALUE, id="empty-symbol"),
    pytest.param(
        GOOD_TICK.replace('"bid":1.0842', '"bid":1e999').encode(), INVALID_VALUE, id="inf-price"
    ),
    pytest.param(b"[1767225600000,1.0842,1.08423]", INVALID_VALUE, id="array"),
]


@pytest.mark.parametrize(("payload", "reason"), REFUSALS)
def test_bad_payload_is_refused_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ContractError) as refused:
        Codec[TickInput](TickInput).decode(payload)
    assert refused.value.reason == reason
    assert refused.value.detail


def test_a_candle_on_a_ticks_only_decoder_is_an_unknown_type() -> None:
    with pytest.raises(ContractError) as refused:
        Codec[TickInput](TickInput).decode(CANDLE_JSON)
    assert refused.value.reason == UNKNOWN_TYPE


def test_oversized_batch_is_refused_before_parsing() -> None:
    row = '{"time_ms":1767225600000,"bid":1.0842,"ask":1.08423,"seq":1,"flags":6}'
    rows = ",".join([row] * 16_000)  # ~1.1 MiB: more than the 1 MiB limit
    payload = f'{{"type":"tick_batch","feed":"icm","symbol":"EURUSD","ticks":[{rows}]}}'.encode()
    assert len(payload) > 1 << 20
    with pytest.raises(ContractError) as refused:
        Codec[TickInput](TickInput).decode(payload)
    assert refused.value.reason == OVERSIZED
    # just under the limit the same kind of batch is fine
    small = payload.replace(("," + row).encode(), b"", 2_000)
    assert len(small) <= 1 << 20
    batch = Codec[TickInput](TickInput).decode(small)
    assert isinstance(batch, TickBatch)
    assert len(batch.ticks) == 14_000


def test_every_reason_is_covered_by_a_refusal_above() -> None:
    covered = {p.values[1] for p in REFUSALS} | {OVERSIZED}
    assert covered == REASONS


# --- immutability ----------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "message"), CANONICAL, ids=IDS)
def test_messages_refuse_mutation(payload: bytes, message: Any) -> None:
    with pytest.raises(AttributeError):
        message.feed = "other"
    with pytest.raises(AttributeError):
        message.v = 2


def test_tick_rows_and_specs_refuse_mutation() -> None:
    with pytest.raises(AttributeError):
        TICK_BATCH.ticks[0].bid = 1.0
    with pytest.raises(AttributeError):
        streams.stream_specs()[0].max_age = 1.0
    with pytest.raises(AttributeError):
        streams.consumer_specs()[0].max_deliver = 1


# --- streams and consumers as data -----------------------------------------------------

DAY = 86_400.0


def test_live_streams_and_their_values() -> None:
    specs = {s.name: s for s in streams.stream_specs()}
    assert {name: s.subjects for name, s in specs.items()} == {
        "TICKS": ("ticks.*.*",),
        "CANDLES": ("candles.*.*.*",),
        "FEATURES": ("features.*.*.*",),
        "SCORES": ("scores.*.*.*",),
        "SIGNALS": ("signals.*.*.*",),
        "DLQ": ("dlq.*",),
        "ADVISORIES": tuple(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{base}.*"
            for base in ("TICKS", "CANDLES", "FEATURES", "SCORES", "SIGNALS")
        ),
    }
    assert {name: s.max_age for name, s in specs.items()} == {
        "TICKS": 7 * DAY,
        "CANDLES": 14 * DAY,
        "FEATURES": 14 * DAY,
        "SCORES": 14 * DAY,
        "SIGNALS": 30 * DAY,
        "DLQ": 30 * DAY,
        "ADVISORIES": 7 * DAY,
    }
    assert specs["TICKS"].max_msg_size == 1_048_576
    assert specs["DLQ"].max_msg_size == 2_097_152
    for spec in specs.values():
        # DLQ's outlasts a last delivery's ack wait (10 min): a dead letter stored before a
        # worker was killed, and the same one made from the server's advisory after, are one
        assert spec.duplicate_window == (1200.0 if spec.name == "DLQ" else 600.0)
        assert spec.retention is streams.Retention.LIMITS
        assert spec.storage is streams.Storage.FILE
        assert spec.discard is streams.Discard.OLD
        assert spec.replicas == 1
        assert spec.description


def test_every_built_subject_lands_in_exactly_one_stream() -> None:
    live = streams.stream_specs()
    replay = streams.stream_specs(namespace="r1")
    built = [
        subjects.ticks("icm", "US500.cash"),
        subjects.candles("icm", "US500.cash", Timeframe.M5),
        subjects.features("icm", "US500.cash", Timeframe.M5),
        subjects.scores("icm", "US500.cash", Timeframe.M5),
        subjects.signals("icm", "US500.cash", Timeframe.M5),
        subjects.dlq("candle-ingest"),
    ]
    for subject in built:
        assert len([s for s in live if _matches(s.subjects, subject)]) == 1
        assert not [s for s in replay if _matches(s.subjects, subject)]
        assert len([s for s in replay if _matches(s.subjects, f"ns.r1.{subject}")]) == 1
    # the server names a stream's advisories by the stream: live and replay apart; every
    # pipeline stream's are kept, DLQ's and ADVISORIES' own are not
    exhausted = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.ea-1"
    for specs, prefix in ((live, ""), (replay, "NS_r1_")):
        for base in ("TICKS", "CANDLES", "FEATURES", "SCORES", "SIGNALS"):
            subject = exhausted.format(prefix + base)
            assert [s.name for s in specs if _matches(s.subjects, subject)] == [specs[-1].name]
        for base in ("DLQ", "ADVISORIES"):
            assert not [s for s in specs if _matches(s.subjects, exhausted.format(prefix + base))]
    assert not [s for s in live if _matches(s.subjects, exhausted.format("NS_r1_SIGNALS"))]


def test_a_namespace_gets_its_own_stream_names_and_subjects() -> None:
    specs = streams.stream_specs(namespace="replay-7", replicas=3)
    assert [s.name for s in specs] == [
        "NS_replay-7_TICKS",
        "NS_replay-7_CANDLES",
        "NS_replay-7_FEATURES",
        "NS_replay-7_SCORES",
        "NS_replay-7_SIGNALS",
        "NS_replay-7_DLQ",
        "NS_replay-7_ADVISORIES",
    ]
    assert specs[0].subjects == ("ns.replay-7.ticks.*.*",)
    assert specs[-2].subjects == ("ns.replay-7.dlq.*",)
    assert specs[-1].subjects == tuple(
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.NS_replay-7_{base}.*"
        for base in ("TICKS", "CANDLES", "FEATURES", "SCORES", "SIGNALS")
    )
    assert {s.replicas for s in specs} == {3}
    with pytest.raises(subjects.SubjectError):
        streams.stream_specs(namespace="bad name")


def test_pipeline_consumers() -> None:
    specs = streams.consumer_specs()
    assert sorted(c.label for c in specs) == sorted(
        [
            "TICKS/candle-ingest",
            "CANDLES/feature-builder",
            "FEATURES/model-scorer",
            "SCORES/signal-publisher",
            "CANDLES/timescale-replicator",
            "FEATURES/timescale-replicator",
            "SCORES/timescale-replicator",
            "SIGNALS/timescale-replicator",
            "ADVISORIES/signal-publisher",
        ]
    )
    stream_subjects = {s.name: s.subjects for s in streams.stream_specs()}
    for c in specs:
        assert c.ack_policy is streams.AckPolicy.EXPLICIT
        assert c.deliver_policy is streams.DeliverPolicy.ALL
        assert c.filter_subjects == stream_subjects[c.stream]
        assert c.backoff[0] == c.ack_wait
        if c.stream != "ADVISORIES":
            assert c.max_deliver > len(c.backoff)
    by_label = {c.label: c for c in specs}
    # the last trace of a message a consumer gave up on: never given up on itself
    assert by_label["ADVISORIES/signal-publisher"].max_deliver == streams.UNLIMITED == -1
    assert by_label["TICKS/candle-ingest"].backoff == (30.0, 60.0, 120.0, 300.0, 600.0)
    assert by_label["TICKS/candle-ingest"].max_deliver == 10
    assert by_label["SIGNALS/timescale-replicator"].ack_wait == 60.0
    assert by_label["SIGNALS/timescale-replicator"].max_ack_pending == 20_000


def test_signal_publisher_has_a_durable_on_the_advisories_besides_its_scores() -> None:
    from workers.signal_publisher.app import Settings

    for ns in (None, "r1"):
        scores = Settings(namespace=ns, partitions=2, partition=1).consumer_spec()
        assert (scores.stream, scores.durable) == (
            streams.stream_name("SCORES", namespace=ns),
            "signal-publisher-1of2",
        )
        advisories = streams.exhausted_deliveries(namespace=ns)
        assert advisories in streams.consumer_specs(namespace=ns)
        assert advisories.durable == "signal-publisher"  # one for every partition
        assert advisories.stream == streams.stream_name("ADVISORIES", namespace=ns)
        assert advisories.ack_policy is streams.AckPolicy.EXPLICIT
        assert advisories.deliver_policy is streams.DeliverPolicy.ALL


def test_namespaced_consumers_bind_namespaced_streams() -> None:
    specs = streams.consumer_specs(namespace="r1")
    assert {c.stream for c in specs} == {
        "NS_r1_TICKS",
        "NS_r1_CANDLES",
        "NS_r1_FEATURES",
        "NS_r1_SCORES",
        "NS_r1_SIGNALS",
        "NS_r1_ADVISORIES",
    }
    assert all(
        f.startswith(("ns.r1.", "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.NS_r1_"))
        for c in specs
        for f in c.filter_subjects
    )


def test_signal_subscriber_starts_at_new_signals_of_its_feed() -> None:
    spec = streams.signal_subscriber("ea-desk1", feed="icm")
    assert spec.label == "SIGNALS/ea-desk1"
    assert spec.filter_subjects == ("signals.icm.*.*",)
    assert spec.deliver_policy is streams.DeliverPolicy.NEW
    with pytest.raises(subjects.SubjectError):
        streams.signal_subscriber("desk 1")


@pytest.mark.parametrize(
    "change",
    [
        {"ack_wait": 5.0},  # the server would silently use backoff[0] instead
        {"max_deliver": 5},  # needs more deliveries than backoff steps
        {"durable": "a.b"},
        {"max_ack_pending": 0},
    ],
)
def test_consumer_specs_the_server_would_alter_or_refuse_are_refused(
    change: dict[str, Any],
) -> None:
    base = streams.consumer_specs()[0]
    with pytest.raises(ValueError, match=r"."):
        msgspec.structs.replace(base, **change)


@pytest.mark.parametrize(
    "change",
    [{"name": "A.B"}, {"subjects": ()}, {"replicas": 0}, {"duplicate_window": 8 * DAY}],
)
def test_stream_specs_the_server_would_refuse_are_refused(change: dict[str, Any]) -> None:
    base = streams.stream_specs()[0]
    with pytest.raises(ValueError, match=r"."):
        msgspec.structs.replace(base, **change)


def test_stream_config_in_the_units_the_server_api_takes() -> None:
    config = streams.to_stream_config(streams.stream_specs()[0])
    wire = config.as_dict()
    assert wire["name"] == "TICKS"
    assert wire["subjects"] == ["ticks.*.*"]
    assert wire["max_age"] == 604_800_000_000_000  # nanoseconds
    assert wire["duplicate_window"] == 600_000_000_000
    assert wire["max_msg_size"] == 1_048_576
    assert wire["max_bytes"] == -1
    assert json.loads(json.dumps(wire))["retention"] == "limits"
    assert json.loads(json.dumps(wire))["storage"] == "file"
    assert json.loads(json.dumps(wire))["discard"] == "old"


def test_consumer_config_in_the_units_the_server_api_takes() -> None:
    config = streams.to_consumer_config(streams.consumer_specs()[0])
    wire = json.loads(json.dumps(config.as_dict()))
    assert wire["durable_name"] == wire["name"] == "candle-ingest"
    assert wire["filter_subjects"] == ["ticks.*.*"]
    assert "filter_subject" not in wire
    assert wire["ack_wait"] == 30_000_000_000
    assert wire["backoff"] == [
        30_000_000_000,
        60_000_000_000,
        120_000_000_000,
        300_000_000_000,
        600_000_000_000,
    ]
    assert wire["ack_policy"] == "explicit"
    assert wire["deliver_policy"] == "all"
    assert wire["max_deliver"] == 10
    assert wire["max_ack_pending"] == 10_000


def test_diff_sees_only_managed_fields_that_differ() -> None:
    spec = streams.stream_specs()[0]
    config = streams.to_stream_config(spec)
    assert streams.stream_diff(spec, config) == []
    # what the server adds on its own is not a difference
    server = config.evolve(metadata={"_nats.ver": "2.15.1"}, max_msgs=-1, max_consumers=-1)
    assert streams.stream_diff(spec, server) == []
    assert streams.stream_diff(spec, config.evolve(max_age=3600.0)) == ["max_age"]

    consumer = streams.consumer_specs()[0]
    cconfig = streams.to_consumer_config(consumer)
    assert streams.consumer_diff(consumer, cconfig) == []
    # a single filter reported in the older field is the same filter
    legacy = cconfig.evolve(filter_subjects=None, filter_subject="ticks.*.*", max_waiting=512)
    assert streams.consumer_diff(consumer, legacy) == []
    changed = cconfig.evolve(max_ack_pending=5, backoff=[30.0])
    assert streams.consumer_diff(consumer, changed) == ["backoff", "max_ack_pending"]


def test_where_a_durable_starts_is_set_once_when_it_is_made() -> None:
    consumer = streams.consumer_specs()[0]
    later = msgspec.structs.replace(consumer, start_seq=1234)
    made = streams.to_consumer_config(later)
    assert (made.deliver_policy, made.opt_start_seq) == ("by_start_sequence", 1234)
    assert streams.to_consumer_config(consumer).opt_start_seq is None
    # an existing durable keeps where it started: ensure neither updates nor refuses it
    assert streams.consumer_diff(consumer, made) == []
    assert streams.consumer_diff(later, streams.to_consumer_config(consumer)) == []
    with pytest.raises(ValueError, match="start_seq must be 1 or more"):
        msgspec.structs.replace(consumer, start_seq=0)


def _matches(patterns: tuple[str, ...], subject: str) -> bool:
    """NATS subject matching with ``*`` (one token) and ``>`` (the rest)."""

    def match(pattern: str) -> bool:
        p, s = pattern.split("."), subject.split(".")
        for i, token in enumerate(p):
            if token == ">":
                return len(s) > i
            if i >= len(s) or (token != "*" and token != s[i]):
                return False
        return len(p) == len(s)

    return any(match(p) for p in patterns)
