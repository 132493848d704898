"""The README's *EA wire format* section is what the code accepts: its JSON examples decode
to the values written here, its subjects and message ids are the ones the code builds, and
its tables name every field and every refusal reason, so the document cannot drift."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from contracts import codec as codec_module
from contracts import subjects
from contracts.codec import Codec
from contracts.messages import Tick, TickBatch, TickInput, TickRow
from workers.candle_ingest import aggregate, validate
from workers.candle_ingest import app as candle_ingest_app
from workers.ea_sim import market

README = Path(__file__).resolve().parents[2] / "README.md"
TIME_MS = 1_741_600_800_123


def section() -> str:
    text = README.read_text()
    start = text.index("\n## EA wire format\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def json_examples() -> list[bytes]:
    return [b.encode() for b in re.findall(r"```json\n(.*?)\n```", section(), re.S)]


def table(header: str) -> list[list[str]]:
    """Rows of the markdown table whose header row starts with ``| header |``."""
    lines = section().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_json_examples_decode_to_the_documented_values() -> None:
    codec: Codec[TickInput] = Codec(TickInput)
    tick, batch = (codec.decode(example) for example in json_examples())
    assert datetime.fromtimestamp(TIME_MS / 1000, UTC) == datetime(
        2025, 3, 10, 10, 0, 0, 123_000, tzinfo=UTC
    )
    assert tick == Tick(
        feed="icm-live",
        symbol="US500.cash",
        time_ms=TIME_MS,
        bid=5210.25,
        ask=5210.75,
        seq=48213,
        flags=6,
    )
    assert batch == TickBatch(
        feed="icm-live",
        symbol="EURUSD",
        ticks=[
            TickRow(time_ms=TIME_MS, bid=1.08452, ask=1.08454, seq=1, flags=6),
            TickRow(time_ms=TIME_MS + 64, bid=1.08453, ask=1.08454, seq=2, flags=2),
        ],
    )
    # every example is plain JSON an MQL5 program can write, one object each
    assert all(isinstance(json.loads(e), dict) for e in json_examples())


def test_the_message_ids_are_the_ones_of_the_examples() -> None:
    text = section()
    tick_id = re.search(r"a tick: .*?e\.g\. `([^`]+)`", text, re.S)
    batch_id = re.search(r"a batch: .*?e\.g\. `([^`]+)`", text, re.S)
    assert tick_id is not None
    assert batch_id is not None
    assert tick_id[1] == market.tick_msg_id("icm-live", "US500.cash", TIME_MS, 48213)
    first = TickRow(time_ms=TIME_MS, bid=1.08452, ask=1.08454, seq=1, flags=6)
    assert batch_id[1] == market.batch_msg_id("icm-live", "EURUSD", first, 2)


def test_the_subject_examples_are_the_ones_the_contracts_build() -> None:
    rows = table("feed")
    assert len(rows) >= 3
    for feed, symbol, subject in (tuple(c for cell in row for c in ticked(cell)) for row in rows):
        assert subjects.ticks(feed, symbol) == subject
        assert subjects.parse(subject)[1:3] == (feed, symbol)


def test_the_field_table_names_every_field_of_a_tick_and_a_batch() -> None:
    documented = {name for row in table("field") for name in ticked(row[0])}
    fields = {f.name for f in msgspec.structs.fields(Tick)}
    fields |= {f.name for f in msgspec.structs.fields(TickBatch)}
    fields |= {f.name for f in msgspec.structs.fields(TickRow)}
    assert documented == fields | {"type"}


def test_the_reason_table_lists_every_refusal_of_a_tick() -> None:
    documented = {name for row in table("reason") for name in ticked(row[0])}
    tick_reasons = set(codec_module.REASONS) | {
        validate.BAD_PRICE,
        validate.BID_ABOVE_ASK,
        validate.NEGATIVE_VOLUME,
        validate.BAD_VOLUME,
        validate.FUTURE_TIME,
        validate.ILLEGAL_SYMBOL,
        aggregate.TOO_LATE,
        aggregate.COVERED_BY_BARS,
        aggregate.NO_LAST_PRICE,
        "subject_mismatch",
        candle_ingest_app.UNKNOWN_SYMBOL,
    }
    assert documented == tick_reasons
