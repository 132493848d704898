"""Backfill from MT5 CSV exports: ``tickwire import mt5-bars|mt5-ticks FILE ...``.

Reads the export with ``mt5_csv`` and publishes onto the symbol's TICKS subject, where
candle-ingest takes it like live input:

- bars: one ``Bar`` per message, ``Nats-Msg-Id`` ``bar|<feed>|<symbol>|<tf>|<open_time_ms>``;
- ticks: ``TickBatch`` messages of up to ``--batch`` ticks (``seq`` None), ``Nats-Msg-Id``
  ``mt5ticks|<feed>|<symbol>|<time_ms of the first tick>|<line number of the first tick>``.

The ids depend only on the file and the options. Before publishing, the importer reads the
ids the stream holds on the symbol's subject (headers only, no payloads) and skips every
message stored already, so an import run again, whole or after it stopped half-way, stores
nothing twice however long after (the stream's duplicate window lasts minutes only). A tick
import repeated with another ``--batch`` or ``--utc-offset`` makes other ids and is not
de-duplicated.

Publishes are asynchronous with at most ``--window`` unacknowledged; a failed or timed-out
publish stops the import with one line and exit code 1. Malformed lines are reported as
``line N: reason: detail`` on stderr (the first ``MAX_REPORTED``, then a count) and
skipped. Exit codes: 0 something was imported; 1 no valid line, NATS unreachable, or a
publish failed; 2 bad arguments, or a file that cannot be opened or lacks the columns needed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Final, NoReturn

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NotFoundError
from tqdm import tqdm

from contracts import subjects
from contracts.codec import encode
from contracts.messages import Bar, TickBatch, TickRow, Timeframe
from contracts.streams import TICKS, ensure, stream_name, stream_specs
from workers.candle_ingest import mt5_csv
from workers.candle_ingest.mt5_csv import HeaderError, ParseError
from workers.runtime.connection import connect_once
from workers.runtime.publish import MSG_ID
from workers.runtime.pull import read_stream
from workers.runtime.settings import RuntimeSettings, load

MAX_REPORTED: Final = 20
"""Malformed lines printed one by one; the rest are only counted."""
RESUME: Final = (
    "; run the same import again (same --batch and --utc-offset) to go on: what the stream"
    " holds already is skipped"
)
"""Said after a publish failure: the ids make a repeated import safe."""
MAX_BATCH: Final = 5000
"""Ticks per message at most: ~130 bytes of JSON each stays well under the 1 MiB limit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class ImportFailed(Exception):
    """The import stopped: the message is the one line to print."""


def _feed(text: str) -> str:
    try:
        return subjects.check_name(text, "feed")
    except subjects.SubjectError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _symbol(text: str) -> str:
    try:
        return subjects.check_symbol(text)
    except subjects.SubjectError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _namespace(text: str) -> str:
    try:
        return subjects.check_name(text, "namespace")
    except subjects.SubjectError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _utc_offset(text: str) -> mt5_csv.ServerTime:
    try:
        return mt5_csv.parse_server_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _point(text: str) -> Decimal:
    try:
        return mt5_csv.parse_point(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}: {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tickwire import", description="Backfill from MT5 CSV exports.")
    sub = p.add_subparsers(dest="kind", required=True, parser_class=_Parser)

    def common(kind: str, help: str) -> argparse.ArgumentParser:
        q = sub.add_parser(kind, help=help, description=help)
        q.add_argument("file", type=_file, metavar="FILE", help="the MT5 export")
        q.add_argument("--feed", required=True, type=_feed, help="broker/account of the prices")
        q.add_argument("--symbol", required=True, type=_symbol, help="symbol as the EA names it")
        q.add_argument(
            "--utc-offset",
            type=_utc_offset,
            default=0,
            metavar="HOURS|ZONE",
            help="broker server time minus UTC, in hours (2 for UTC+2), or the time zone its "
            "clock follows (Europe/Athens; America/New_York+7 for New York time plus 7 h): "
            "UTC all year across daylight saving changes; default 0",
        )
        q.add_argument(
            "--namespace",
            type=_namespace,
            default=None,
            help="publish into this replay namespace (default: $TICKWIRE_NAMESPACE, else live)",
        )
        q.add_argument(
            "--window",
            type=_bounded(1, 100_000),
            default=2000,
            help="unacknowledged publishes at most (default 2000)",
        )
        q.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="progress bar on stderr (default: only when stderr is a terminal)",
        )
        return q

    bars = common("mt5-bars", "publish the bars of an MT5 bar export")
    bars.add_argument("--tf", required=True, choices=[tf.value for tf in Timeframe])
    bars.add_argument(
        "--point",
        type=_point,
        default=None,
        help="price of one spread point, e.g. 0.00001 (default: 10^-digits, digits being "
        "the most decimals among the prices of the first 1000 lines)",
    )
    ticks = common("mt5-ticks", "publish the ticks of an MT5 tick export")
    ticks.add_argument(
        "--batch",
        type=_bounded(1, MAX_BATCH),
        default=500,
        help=f"ticks per message, 1..{MAX_BATCH} (default 500)",
    )
    return p


# --- what is published ---------------------------------------------------------------


@dataclass
class Outcome:
    lines: int = 0
    malformed: int = 0
    items: int = 0
    """Valid bars or ticks read: all published unless the import stopped."""
    published: int = 0
    new: int = 0
    duplicate: int = 0
    held: int = 0
    """Messages the stream held already (an earlier run of the same import): not sent."""

    def summary(self, kind: str, path: Path, note: str = "") -> str:
        what = "bars" if kind == "mt5-bars" else "ticks"
        sent = f"{self.published} messages published ({self.new} new, {self.duplicate} duplicate)"
        if self.held:
            sent = f"{self.items} {what}: {self.held} messages on the stream already, {sent}"
        else:
            sent = f"{self.items} {what} in {sent}"
        return f"{path}: {self.lines} lines read, {sent}, {self.malformed} malformed lines skipped{note}"


class _Malformed:
    """Prints the first malformed lines (around the progress bar), counts all of them."""

    def __init__(self, outcome: Outcome) -> None:
        self._outcome = outcome

    def __call__(self, number: int, error: ParseError) -> None:
        self._outcome.malformed += 1
        if self._outcome.malformed <= MAX_REPORTED:
            tqdm.write(f"line {number}: {error.reason}: {error.detail}", file=sys.stderr)

    def finish(self) -> None:
        hidden = self._outcome.malformed - MAX_REPORTED
        if hidden > 0:
            tqdm.write(f"... and {hidden} more malformed lines", file=sys.stderr)


def bar_ids(feed: str, symbol: str, tf: Timeframe) -> str:
    """What the ids of a bar import's messages start with."""
    return f"bar|{feed}|{symbol}|{tf.value}|"


def tick_ids(feed: str, symbol: str) -> str:
    """What the ids of a tick import's messages start with."""
    return f"mt5ticks|{feed}|{symbol}|"


def bar_msg_id(bar: Bar) -> str:
    return f"{bar_ids(bar.feed, bar.symbol, bar.tf)}{bar.open_time_ms}"


def tick_batch_msg_id(feed: str, symbol: str, first: TickRow, first_line: int) -> str:
    return f"{tick_ids(feed, symbol)}{first.time_ms}|{first_line}"


Message = tuple[bytes, str]
"""Payload and ``Nats-Msg-Id``."""


def _bar_messages(
    items: Iterable[tuple[int, Bar | ParseError]], outcome: Outcome, malformed: _Malformed
) -> Iterator[Message]:
    for number, item in items:
        outcome.lines += 1
        if isinstance(item, ParseError):
            malformed(number, item)
            continue
        outcome.items += 1
        yield encode(item), bar_msg_id(item)


def _tick_messages(
    items: Iterable[tuple[int, TickRow | ParseError]],
    feed: str,
    symbol: str,
    batch: int,
    outcome: Outcome,
    malformed: _Malformed,
) -> Iterator[Message]:
    rows: list[TickRow] = []
    first_line = 0

    def message() -> Message:
        payload = encode(TickBatch(feed=feed, symbol=symbol, ticks=rows))
        return payload, tick_batch_msg_id(feed, symbol, rows[0], first_line)

    for number, item in items:
        outcome.lines += 1
        if isinstance(item, ParseError):
            malformed(number, item)
            continue
        if not rows:
            first_line = number
        rows.append(item)
        outcome.items += 1
        if len(rows) >= batch:
            yield message()
            rows = []
    if rows:
        yield message()


async def stored_ids(
    nc: Client, js: JetStreamContext, stream: str, subject: str, prefix: str, *, progress: bool
) -> set[str]:
    """The ids starting with ``prefix`` of the messages ``stream`` holds on ``subject``, read
    without their payloads through a short-lived consumer: what earlier runs stored."""
    try:
        last = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return set()
    assert last.seq is not None
    ids: set[str] = set()
    reading = read_stream(
        nc,
        js,
        stream,
        consumer="tickwire-import-" + hashlib.sha256(subject.encode()).hexdigest()[:16],
        filter_subjects=[subject],
        last=last.seq,
        desc=f"ids on {subject}",
        progress=progress,
        headers_only=True,
    )
    async with contextlib.aclosing(reading) as batches:
        async for batch in batches:
            for _, msg in batch:
                msg_id = msg.headers.get(MSG_ID) if msg.headers else None
                if msg_id is not None and msg_id.startswith(prefix):
                    ids.add(msg_id)
    return ids


def _not_held(messages: Iterable[Message], held: set[str], outcome: Outcome) -> Iterator[Message]:
    for message in messages:
        if message[1] in held:
            outcome.held += 1
        else:
            yield message


async def publish_all(
    js: JetStreamContext,
    subject: str,
    messages: Iterable[Message],
    outcome: Outcome,
    *,
    window: int,
    timeout_s: float,
    max_msg_size: int = -1,
) -> None:
    """Publish in order with at most ``window`` unacknowledged; stop at the first failure.

    nats-py 2.16 leaves a ``publish_async`` future pending forever when the server answers
    with an error (nats-io/nats.py#985), so a refusal shows up here as a missing ack. The
    oldest unacknowledged message is then published once more, synchronously and with the
    same ``Nats-Msg-Id`` (harmless if it was stored), to report the server's reason. A
    message larger than the stream allows is refused before it is sent.
    """
    inflight: collections.deque[tuple[asyncio.Future[PubAck], Message]] = collections.deque()

    def failed(exc: BaseException) -> ImportFailed:
        return ImportFailed(
            f"publish failed after {outcome.published} acknowledged messages: "
            f"{type(exc).__name__}: {exc}{RESUME}"
        )

    async def why_no_ack(message: Message) -> ImportFailed:
        payload, msg_id = message
        try:
            await js.publish(subject, payload, timeout=timeout_s, headers={MSG_ID: msg_id})
        except Exception as exc:
            return failed(exc)
        return ImportFailed(
            f"no publish acknowledgement within {timeout_s:g} s "
            f"after {outcome.published} acknowledged messages{RESUME}"
        )

    async def settle(keep: int) -> None:
        while len(inflight) > keep:
            future, message = inflight[0]
            try:
                if not future.done():
                    await asyncio.wait_for(asyncio.shield(future), timeout_s)
                ack = future.result()
            except TimeoutError:
                raise await why_no_ack(message) from None
            except Exception as exc:
                raise failed(exc) from None
            inflight.popleft()
            outcome.published += 1
            if ack.duplicate:
                outcome.duplicate += 1
            else:
                outcome.new += 1

    try:
        for message in messages:
            payload, msg_id = message
            if 0 < max_msg_size < len(payload):
                raise ImportFailed(
                    f"a message of {len(payload)} bytes exceeds the stream's max_msg_size "
                    f"{max_msg_size}: use a smaller --batch"
                )
            if len(inflight) >= window:
                await settle(window - 1)
            try:
                future = await js.publish_async(
                    subject, payload, headers={MSG_ID: msg_id}, wait_stall=timeout_s
                )
            except Exception as exc:
                raise failed(exc) from None
            inflight.append((future, message))
        await settle(0)
    finally:
        for future, _ in inflight:
            future.cancel()


async def _ensure_streams(js: JetStreamContext, namespace: str | None) -> int:
    """Create the streams that do not exist; never change one that does (a production
    stream may have replicas or limits this process does not know about).

    Returns the TICKS stream's ``max_msg_size``.
    """
    missing = []
    for spec in stream_specs(namespace=namespace):
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            missing.append(spec)
    await ensure(js, missing)
    info = await js.stream_info(stream_name(TICKS, namespace=namespace))
    return info.config.max_msg_size or -1


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"tickwire import: {message}\n")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {} if args.namespace is None else {"namespace": args.namespace}
    settings = load(RuntimeSettings, **overrides)
    try:
        subject = subjects.ticks(args.feed, args.symbol, namespace=settings.namespace)
    except subjects.SubjectError as exc:
        return _fail(str(exc), 2)  # a bad TICKWIRE_NAMESPACE

    path: Path = args.file
    show = sys.stderr.isatty() if args.progress is None else bool(args.progress)
    progress_bar = tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=path.name,
        file=sys.stderr,
        disable=not show,
        leave=False,
    )

    def progress(position: int) -> None:
        progress_bar.update(position - progress_bar.n)

    outcome = Outcome()
    malformed = _Malformed(outcome)
    messages: Iterator[Message]
    point_note = ""
    try:
        if args.kind == "mt5-bars":
            tf = Timeframe(args.tf)
            prefix = bar_ids(args.feed, args.symbol, tf)
            point = args.point
            if point is None:
                point = mt5_csv.infer_point(path)
                point_note = f", spread point {point} (inferred from the prices' decimals)"
            bars = mt5_csv.iter_bars(
                path,
                feed=args.feed,
                symbol=args.symbol,
                tf=tf,
                server_time=args.utc_offset,
                point=point,
                progress=progress,
            )
            messages = _bar_messages(bars, outcome, malformed)
        else:
            prefix = tick_ids(args.feed, args.symbol)
            ticks = mt5_csv.iter_ticks(
                path,
                feed=args.feed,
                symbol=args.symbol,
                server_time=args.utc_offset,
                progress=progress,
            )
            messages = _tick_messages(ticks, args.feed, args.symbol, args.batch, outcome, malformed)
    except (HeaderError, OSError) as exc:
        progress_bar.close()
        return _fail(str(exc), 2)

    async def run() -> None:
        try:
            nc = await connect_once(settings, "tickwire-import")
        except (TimeoutError, OSError) as exc:
            raise ImportFailed(
                f"NATS at {settings.nats_url} did not answer: {exc or 'timed out'}"
            ) from None
        try:
            js = nc.jetstream(publish_async_max_pending=args.window)
            try:
                max_msg_size = await _ensure_streams(js, settings.namespace)
            except Exception as exc:
                raise ImportFailed(f"cannot create the streams: {exc!r}") from None
            stream = stream_name(TICKS, namespace=settings.namespace)
            try:
                held = await stored_ids(nc, js, stream, subject, prefix, progress=show)
            except Exception as exc:
                raise ImportFailed(f"cannot read the ids {stream} holds: {exc!r}") from None
            await publish_all(
                js,
                subject,
                _not_held(messages, held, outcome),
                outcome,
                window=args.window,
                timeout_s=settings.publish_timeout_s,
                max_msg_size=max_msg_size,
            )
        finally:
            await nc.close()

    failure = None
    try:
        asyncio.run(run())
    except ImportFailed as exc:
        failure = str(exc)
    except OSError as exc:
        failure = f"cannot read {path}: {exc}"
    finally:
        progress_bar.close()
    malformed.finish()
    print(outcome.summary(args.kind, path, point_note) + (" (stopped)" if failure else ""))
    if failure is not None:
        return _fail(failure, 1)
    if outcome.items == 0:
        return _fail(f"{path}: no valid line, nothing imported", 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
