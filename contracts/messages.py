"""Every message tickwire exchanges, defined once.

Rules that hold for every struct here:

- ``frozen=True, kw_only=True``: a published message is never mutated.
- ``v`` is the schema version. Evolution adds fields with defaults; a field's type never
  changes. A message whose ``v`` is not in ``SUPPORTED_VERSIONS`` is refused as
  ``unknown_schema_version``.
- Times are integer milliseconds since the Unix epoch, UTC. Never floats, never local time.
- Prices are the doubles the terminal sent. JSON carries them in shortest round-trip form,
  so a price decodes to the same double and encodes to the same text; OHLC values are
  selected from ticks, never computed, so they stay exact.
- Payloads hold nothing taken from the wall clock of the process that builds them, so the
  same input yields byte-identical output, live or replayed.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final, Literal

import msgspec

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})

Price = Annotated[float, msgspec.Meta(description="price as sent by the terminal")]
EpochMs = Annotated[int, msgspec.Meta(ge=0, description="UTC time, integer milliseconds")]
Symbol = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Feed = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=32,
        # "(?!\n)": Python's "$" also matches before a final newline, JSON Schema's does not
        pattern=r"^[A-Za-z0-9_-]+$(?!\n)",
        description="broker/account the prices come from; never mixed with another feed",
    ),
]


class Timeframe(enum.StrEnum):
    M1 = "M1"
    M5 = "M5"
    M15 = "M15"
    M30 = "M30"
    H1 = "H1"
    H4 = "H4"
    D1 = "D1"

    @property
    def ms(self) -> int:
        return _TF_MS[self]


_TF_MS: Final = {
    Timeframe.M1: 60_000,
    Timeframe.M5: 300_000,
    Timeframe.M15: 900_000,
    Timeframe.M30: 1_800_000,
    Timeframe.H1: 3_600_000,
    Timeframe.H4: 14_400_000,
    Timeframe.D1: 86_400_000,
}


class Side(enum.StrEnum):
    BUY = "BUY"
    SELL = "SELL"
    FLAT = "FLAT"


class _Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    v: int = SCHEMA_VERSION


# --- input from the Expert Advisor ---------------------------------------------------


class Tick(_Message, tag="tick", tag_field="type", frozen=True, kw_only=True):
    """One tick as an MT5 EA sends it (``MqlTick``), for one feed and symbol."""

    feed: Feed
    symbol: Symbol
    time_ms: EpochMs
    bid: Price
    ask: Price
    last: Price | None = None
    volume: float | None = None
    """Real (exchange) volume when the symbol has one."""
    seq: int | None = None
    """The EA's per-symbol sequence number, increasing by one per tick."""
    flags: int = 0
    """``MqlTick.flags`` (TICK_FLAG_BID, TICK_FLAG_ASK, ...)."""


class TickRow(msgspec.Struct, frozen=True, kw_only=True, array_like=False):
    """One tick inside a ``TickBatch``: feed and symbol are the batch's."""

    time_ms: EpochMs
    bid: Price
    ask: Price
    last: Price | None = None
    volume: float | None = None
    seq: int | None = None
    flags: int = 0


class TickBatch(_Message, tag="tick_batch", tag_field="type", frozen=True, kw_only=True):
    """Ticks of one feed and symbol, in the order the EA saw them."""

    feed: Feed
    symbol: Symbol
    ticks: list[TickRow]


class Bar(_Message, tag="bar", tag_field="type", frozen=True, kw_only=True):
    """A historical bar published for backfill (an MT5 bar export row)."""

    feed: Feed
    symbol: Symbol
    tf: Timeframe
    open_time_ms: EpochMs
    open: Price
    high: Price
    low: Price
    close: Price
    tick_volume: Annotated[int, msgspec.Meta(ge=0)] = 0
    real_volume: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    spread: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Spread as MT5 exports it, in price units."""


class Watermark(_Message, tag="watermark", tag_field="type", kw_only=True, frozen=True):
    """Event time of one feed and symbol has reached ``time_ms``, with no tick to say so.

    candle-ingest publishes it onto the symbol's TICKS subject when the symbol has been idle
    past a candle's end plus the grace time, and consumes it like a tick: idle symbols close
    their candles, and because the decision is in the stream a replay closes them the same.
    """

    feed: Feed
    symbol: Symbol
    time_ms: EpochMs

    @property
    def msg_id(self) -> str:
        """Its ``Nats-Msg-Id``; candle-ingest takes no watermark without it (an EA sends
        ticks, and a watermark it sent by mistake would close the symbol's candles)."""
        return f"wm|{self.feed}|{self.symbol}|{self.time_ms}"


TickInput = Tick | TickBatch | Bar | Watermark
"""What may arrive on a TICKS subject."""


# --- produced by the pipeline --------------------------------------------------------


class Candle(_Message, tag="candle", tag_field="type", frozen=True, kw_only=True):
    """OHLC of one period for one feed, symbol and timeframe.

    Natural key: (feed, symbol, tf, open_time_ms). ``revision`` starts at 0 and grows by one
    each time a late tick changes the candle; a later revision replaces an earlier one.
    """

    feed: Feed
    symbol: Symbol
    tf: Timeframe
    open_time_ms: EpochMs
    close_time_ms: EpochMs
    """End of the period, exclusive."""
    open: Price
    high: Price
    low: Price
    close: Price
    tick_volume: Annotated[int, msgspec.Meta(ge=0)]
    real_volume: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    spread_mean: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    spread_max: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    first_tick_ms: EpochMs
    last_tick_ms: EpochMs
    revision: Annotated[int, msgspec.Meta(ge=0)] = 0
    source: Literal["ticks", "bars"] = "ticks"


class FeatureVector(_Message, tag="features", tag_field="type", frozen=True, kw_only=True):
    """Features of one closed candle, computed only from that candle and earlier ones."""

    feed: Feed
    symbol: Symbol
    tf: Timeframe
    open_time_ms: EpochMs
    candle_revision: Annotated[int, msgspec.Meta(ge=0)]
    close: Price
    """The candle's close: the reference price a signal on this candle quotes."""
    close_time_ms: EpochMs
    """End of the candle's period, exclusive."""
    last_tick_ms: EpochMs
    """Event time of the candle's last tick, the start of tick-to-signal latency."""
    feature_set_id: str
    values: list[float]
    """In the order of the feature set's names."""
    warming_up: bool = False
    """True until every feature has enough history; such vectors are never scored."""
    rebuild: Annotated[int, msgspec.Meta(ge=0)] = 0
    """0 as the pipeline made it; n > 0 when ``tickwire rebuild`` replaced it for the n-th
    time: its ``Nats-Msg-Id`` then ends in ``|rebuild-<n>``. Sinks and subscribers take it
    like any other; model-scorer and signal-publisher leave it to the rebuild, which makes
    what follows from it itself."""


class Score(_Message, tag="score", tag_field="type", frozen=True, kw_only=True):
    """A model's output for one feature vector."""

    feed: Feed
    symbol: Symbol
    tf: Timeframe
    open_time_ms: EpochMs
    candle_revision: Annotated[int, msgspec.Meta(ge=0)]
    close: Price
    """Carried from the feature vector: the candle's close."""
    close_time_ms: EpochMs
    last_tick_ms: EpochMs
    feature_set_id: str
    model_version: str
    probabilities: list[float]
    """Class probabilities in the model's class order (down, flat, up or negative, positive)."""
    score: float
    """Signed conviction in [-1, 1]: P(last class) - P(first class), i.e. P(up) - P(down)
    for a three-class model and P(positive) - P(negative) = 2 P(up) - 1 for a binary one."""
    rebuild: Annotated[int, msgspec.Meta(ge=0)] = 0
    """0 as the pipeline made it; n > 0 when ``tickwire rebuild`` replaced it for the n-th
    time: its ``Nats-Msg-Id`` then ends in ``|rebuild-<n>``. Sinks and subscribers take it
    like any other; model-scorer and signal-publisher leave it to the rebuild, which makes
    what follows from it itself."""


class Signal(_Message, tag="signal", tag_field="type", frozen=True, kw_only=True):
    """A trading decision for downstream subscribers; never act on it at or after
    ``expires_ms``."""

    signal_id: str
    """Deterministic: feed, symbol, tf, candle open time and model version. Also the
    ``Nats-Msg-Id`` it is published with."""
    feed: Feed
    symbol: Symbol
    tf: Timeframe
    open_time_ms: EpochMs
    candle_revision: Annotated[int, msgspec.Meta(ge=0)]
    side: Side
    strength: Annotated[float, msgspec.Meta(ge=0, le=1)]
    ref_price: Price
    expires_ms: EpochMs
    model_version: str
    feature_set_id: str
    corrects: str | None = None
    """Id of the signal this one replaces after a candle revision changed the decision."""
    rebuild: Annotated[int, msgspec.Meta(ge=0)] = 0
    """0 as the pipeline made it; n > 0 when ``tickwire rebuild`` replaced it for the n-th
    time: its ``Nats-Msg-Id`` then ends in ``|rebuild-<n>``. Sinks and subscribers take it
    like any other; model-scorer and signal-publisher leave it to the rebuild, which makes
    what follows from it itself."""


class DeadLetter(_Message, tag="dead_letter", tag_field="type", frozen=True, kw_only=True):
    """A message a worker refused, kept whole with the reason, for inspection and requeue."""

    worker: str
    reason: str
    """Machine-readable, from a small fixed vocabulary (``malformed_json``, ``too_late``...)."""
    detail: str
    subject: str
    """Where the original message was published: requeue sends it back there."""
    payload: bytes
    headers: dict[str, str] = {}
    stream: str | None = None
    stream_seq: int | None = None
    deliveries: int | None = None
    failed_at_ms: EpochMs = 0
    """Wall-clock time of refusal (dead letters are diagnostics, not pipeline output)."""


ALL_MESSAGES: Final[tuple[type[_Message], ...]] = (
    Tick,
    TickBatch,
    Bar,
    Watermark,
    Candle,
    FeatureVector,
    Score,
    Signal,
    DeadLetter,
)
