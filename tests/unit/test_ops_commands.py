"""The pure parts of ``tickwire dlq`` and ``tickwire status``: no server needed."""

from __future__ import annotations

import random

import msgspec
import pandas as pd
import pytest

from contracts import subjects
from contracts.messages import DeadLetter, Tick, Timeframe
from tests.candles import series
from workers import cli
from workers.dlq import (
    ORIGINAL_ID,
    REQUEUED_FROM,
    DlqError,
    Letter,
    check_payload,
    pretty,
    requeue_headers,
    summarize,
)
from workers.status import health_targets, render


def letter(worker: str, reason: str, failed_at_ms: int, **kw: object) -> DeadLetter:
    return DeadLetter(
        worker=worker,
        reason=reason,
        detail="",
        subject="candles.feed-a.EURUSD.M1",
        payload=b"{}",
        failed_at_ms=failed_at_ms,
        **kw,  # type: ignore[arg-type]
    )


def test_summary_counts_per_worker_and_reason_like_a_groupby() -> None:
    rng = random.Random(3)
    items = [
        Letter(
            seq,
            letter(
                rng.choice(["candle-ingest", "feature-builder"]),
                rng.choice(["too_late", "malformed_json", "bad_price"]),
                rng.randrange(1_700_000_000_000, 1_700_000_900_000),
            ),
        )
        for seq in range(1, 500)
    ]
    frame = pd.DataFrame(
        [(i.letter.worker, i.letter.reason, i.letter.failed_at_ms) for i in items],
        columns=["worker", "reason", "t"],
    )
    want = frame.groupby(["worker", "reason"])["t"].agg(["count", "min", "max"]).reset_index()
    got = summarize(items)
    assert [(s.worker, s.reason, s.count, s.first_ms, s.last_ms) for s in got] == [
        tuple(row) for row in want.itertuples(index=False)
    ]


def test_requeue_headers_keep_the_original_and_get_a_fresh_deterministic_id() -> None:
    d = letter(
        "feature-builder",
        "bad_price",
        1,
        headers={
            "Nats-Msg-Id": "orig-1",
            "X-Trace": "ea-7",
            "Nats-Expected-Last-Sequence": "41",
        },
    )
    headers = requeue_headers(d, "DLQ", 17)
    assert headers == {
        "X-Trace": "ea-7",
        ORIGINAL_ID: "orig-1",
        REQUEUED_FROM: "DLQ:17",
        "Tickwire-Requeued-For": "feature-builder",
        "Nats-Msg-Id": "requeue|DLQ|17",
    }
    assert requeue_headers(d, "DLQ", 17) == headers
    assert requeue_headers(d, "DLQ", 18)["Nats-Msg-Id"] != headers["Nats-Msg-Id"]
    # refused again after the requeue, and requeued again: still the producer's id
    again = letter("feature-builder", "bad_price", 2, headers=headers)
    assert requeue_headers(again, "DLQ", 30)[ORIGINAL_ID] == "orig-1"
    # refused by another worker that time: sent back to that one
    other = letter("timescale-replicator", "db_refused", 3, headers=headers)
    assert requeue_headers(other, "DLQ", 31)["Tickwire-Requeued-For"] == "timescale-replicator"


def test_a_payload_is_checked_against_its_subjects_message_type() -> None:
    candle = series(1)[0]
    subject = subjects.candles(candle.feed, candle.symbol, candle.tf, namespace="r1")
    check_payload(subject, msgspec.json.encode(candle))
    tick = Tick(feed="feed-a", symbol="US500.cash", time_ms=1, bid=1.0, ask=1.1)
    check_payload(subjects.ticks("feed-a", "US500.cash"), msgspec.json.encode(tick))
    refused = [
        (subject, b'{"type":"candle"'),  # malformed
        (subject, msgspec.json.encode(tick)),  # a tick on a candle subject
        (subject, msgspec.json.encode(msgspec.structs.replace(candle, symbol="GBPUSD"))),
        (subjects.candles(candle.feed, candle.symbol, Timeframe.H1), msgspec.json.encode(candle)),
        ("dlq.feature-builder", msgspec.json.encode(candle)),
    ]
    for subj, payload in refused:
        with pytest.raises(DlqError):
            check_payload(subj, payload)


def test_pretty_indents_json_and_shows_other_bytes_as_they_are() -> None:
    assert pretty(b'{"a":1,"b":[2]}') == '{\n  "a": 1,\n  "b": [\n    2\n  ]\n}'
    assert pretty(b"\xff{") == repr(b"\xff{")


def test_health_targets_parse_and_refuse() -> None:
    assert health_targets(" a=127.0.0.1:9101, b=[::1]:80 ,") == [
        ("a", "127.0.0.1", 9101),
        ("b", "::1", 80),
    ]
    for bad in ("a", "a=host", "a=host:x", "=h:1", "a=h:0", "a=h:70000"):
        with pytest.raises(ValueError, match=r"not worker=host:port|port out of range"):
            health_targets(bad)


def test_render_aligns_columns() -> None:
    lines = render(("name", "n"), [("a", "10"), ("bbb", "2")])
    assert lines == ["name   n", "----  --", "a     10", "bbb    2"]


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "requeue"],
        ["dlq", "requeue", "--worker", "feature-builder"],
        ["dlq", "requeue", "3", "--worker", "feature-builder", "--reason", "x"],
        ["dlq", "requeue", "--worker", "w", "--reason", "r", "--payload-file", "f.json"],
        ["dlq", "show", "0"],
        ["dlq", "show", "x"],
        ["dlq", "purge"],
        ["dlq", "requeue", "--worker", "w", "--reason", "r", "--limit", "-1"],
        ["dlq", "list", "--namespace", "a.b"],
    ],
)
def test_bad_dlq_arguments_are_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TICKWIRE_NATS_URL", "nats://127.0.0.1:1")  # never reached
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
