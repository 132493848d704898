"""``tickwire ea-sim``: publish ticks exactly as MT5 Expert Advisors would.

Either simulated terminals (``--feeds``, ``--symbols``, ``--seed``; see ``market``) or the
replay of an MT5 tick export (``--csv FILE --feed F --symbol S``, read by
``candle_ingest.mt5_csv``, ticks numbered 1, 2, ... as an EA numbers them).

Each message is a plain JetStream publish to ``ticks.<feed>.<escaped symbol>`` with the
EA's deterministic ``Nats-Msg-Id``, at most ``--window`` unacknowledged. It needs nothing
but the ``ea`` user's rights (publish on ``ticks.>``, replies on ``_INBOX.>``): it creates
no stream. Credentials come from ``--user``/``--password``, else the ``TICKWIRE_NATS_*``
settings (a URL may carry ``user:password@`` too).

Pacing: ``--speed X`` publishes a message when X times the wall-clock time since the start
has passed in event time (``max``: at once); ``--rate N`` publishes N ticks per second
whatever their event times. Exit codes: 0 done, 1 NATS unreachable at the start or a
publish refused, 2 bad arguments.

A full JetStream store (the server's or the account's file limit) is not a failure: the
EA says so in one line, publishes the same message again with growing pauses until the
server has room, says when it has, and goes on in order. Nothing is dropped. Nor is a
server that restarts or drops out of reach mid-run: the EA reconnects, says so, and
publishes what was not answered again with the same ids (stored once).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, NoReturn

import msgspec
from nats.aio.client import Client
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError
from tqdm import tqdm

from contracts import subjects
from contracts.messages import TickRow
from workers.candle_ingest import mt5_csv
from workers.candle_ingest.importer import MAX_BATCH
from workers.candle_ingest.mt5_csv import HeaderError, ParseError
from workers.ea_sim import market
from workers.ea_sim.market import Outgoing
from workers.runtime.connection import connect
from workers.runtime.publish import MSG_ID
from workers.runtime.settings import RuntimeSettings, load

PROG: Final = "tickwire ea-sim"
CONNECT_ATTEMPTS: Final = 3
"""The first connection is given this many times TICKWIRE_NATS_CONNECT_TIMEOUT_S."""
MAX_REPORTED: Final = 20
"""Malformed CSV lines printed one by one; the rest are only counted."""
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNIT_MS: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
STORE_FULL: Final = frozenset({10002, 10023, 10047})
"""JetStream error codes of a refusal for want of storage: the account's limit, the server's
(``insufficient resources``), a reservation. Waited out, never a reason to stop."""
FULL_RETRY_S: Final = (0.1, 5.0)
"""First and longest pause between two publishes of a message the full store refused."""
STILL_FULL_EVERY_S: Final = 30.0
NO_STREAM_RETRY_S: Final = 0.1
"""Pause between two publishes of a message no stream answered, within its grace."""
OUTAGE_RETRY_S: Final = 0.1
"""Pause between two publishes of a message the connection could not write."""
STILL_AWAY_EVERY_S: Final = 30.0
PACE_AHEAD_S: Final = 0.010
"""A paced message due within this much of now goes at once: a paced EA wakes at most about
100 times a second, not once per tick, and what is due goes out in one write. A wake-up
costs a process more CPU than publishing a tick does; on a small VM, several times more."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class SimFailed(Exception):
    """Publishing stopped: the message is the one line to print."""


def _checked(check: Callable[[str], str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        try:
            return check(text)
        except subjects.SubjectError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _feeds(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",")]
    feeds = [_checked(lambda n: subjects.check_name(n, "feed"))(n) for n in names]
    if len(set(feeds)) != len(feeds):
        raise argparse.ArgumentTypeError(f"a feed is named twice: {text!r}")
    return feeds


def _symbols(text: str) -> list[str]:
    symbols = [s.strip() for s in text.split(",")]
    for s in symbols:
        if s not in market.SYMBOLS:
            known = ", ".join(market.SYMBOLS)
            raise argparse.ArgumentTypeError(f"unknown symbol {s!r}; simulated are: {known}")
    if len(set(symbols)) != len(symbols):
        raise argparse.ArgumentTypeError(f"a symbol is named twice: {text!r}")
    return symbols


def _start(text: str) -> int:
    """ISO time (UTC when it has no offset) or ``now``, as epoch milliseconds."""
    if text == "now":
        return time.time_ns() // 1_000_000
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time or 'now': {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ms = round(when.timestamp() * 1000)
    if ms < 0:
        raise argparse.ArgumentTypeError(f"before 1970: {text!r}")
    return ms


def _speed(text: str) -> float:
    """A factor of real time, or ``max`` (infinite: no pacing)."""
    if text == "max":
        return math.inf
    value = _positive(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"use 'max' for no pacing: {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0: {text!r}")
    return value


def _count(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}..{high}: {value}")
        return value

    return parse


def _duration(text: str) -> int:
    """``90s``, ``30m``, ``2h``, ``1d``, ``500ms`` or plain seconds, as milliseconds."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration like 90s, 30m, 2h or 1d: {text!r}")
    ms = round(float(m[1]) * _UNIT_MS[m[2] or "s"])
    if ms <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0: {text!r}")
    return ms


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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Publish ticks as MT5 Expert Advisors would: simulated, or an MT5 tick "
        "export replayed.",
    )
    sim = p.add_argument_group("simulated terminals")
    sim.add_argument("--seed", type=int, default=0, help="same seed, same messages (default 0)")
    sim.add_argument(
        "--feeds", type=_feeds, default=None, help="comma-separated feeds (default sim)"
    )
    sim.add_argument(
        "--symbols",
        type=_symbols,
        default=None,
        help=f"comma-separated, of: {', '.join(market.SYMBOLS)} (default EURUSD)",
    )
    sim.add_argument(
        "--start",
        type=_start,
        default=None,
        help="event time of the first tick: ISO time, UTC if naive, or 'now' (default now; "
        "give it for repeatable output)",
    )
    sim.add_argument("--duration", type=_duration, help="event time to cover: 90s, 30m, 2h, 1d")
    sim.add_argument("--ticks", type=_count(1, 10**12), help="stop after this many ticks")

    csv = p.add_argument_group("MT5 tick export replay")
    csv.add_argument("--csv", type=_file, metavar="FILE", help="an MT5 tick export to replay")
    csv.add_argument("--feed", type=_checked(lambda n: subjects.check_name(n, "feed")))
    csv.add_argument("--symbol", type=_checked(subjects.check_symbol))
    csv.add_argument(
        "--utc-offset",
        type=_utc_offset,
        default=0,
        metavar="HOURS|ZONE",
        help="broker server time minus UTC, in hours, or the time zone its clock follows "
        "(Europe/Athens, America/New_York+7); default 0",
    )

    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--speed",
        type=_speed,
        default=None,
        help="event time runs this many times faster than real time, or 'max' (default 1)",
    )
    pace.add_argument("--rate", type=_positive, help="ticks per second of wall-clock time")

    out = p.add_argument_group("publishing")
    out.add_argument(
        "--batch",
        type=_count(1, MAX_BATCH),
        default=1,
        help=f"ticks per message, 1..{MAX_BATCH}: 1 sends a Tick, more a TickBatch (default 1)",
    )
    out.add_argument(
        "--batch-wait-ms",
        type=_count(0, 86_400_000),
        default=1000,
        help="a batch goes out when its first tick is this old in event time (default 1000)",
    )
    out.add_argument(
        "--window",
        type=_count(1, 100_000),
        default=1000,
        help="unacknowledged publishes at most (default 1000)",
    )
    out.add_argument("--user", help="NATS user (default $TICKWIRE_NATS_USER), e.g. ea")
    out.add_argument("--password", help="NATS password (default $TICKWIRE_NATS_PASSWORD)")
    out.add_argument(
        "--namespace",
        type=_checked(lambda n: subjects.check_name(n, "namespace")),
        default=None,
        help="publish into this replay namespace (default: $TICKWIRE_NAMESPACE, else live)",
    )
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only when stderr is a terminal)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the combination; a bad one exits 2 with one line."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.csv is not None:
        if args.feed is None or args.symbol is None:
            p.error("--csv needs --feed and --symbol")
        for flag in ("feeds", "symbols", "start", "duration", "ticks"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag} is for simulated terminals, not with --csv")
    elif args.feed is not None or args.symbol is not None:
        p.error("--feed and --symbol go with --csv; simulated terminals take --feeds, --symbols")
    else:
        args.feeds = args.feeds or ["sim"]
        args.symbols = args.symbols or ["EURUSD"]
    if args.speed is None and args.rate is None:
        args.speed = 1.0
    return args


# --- what is published --------------------------------------------------------------


def simulated(args: argparse.Namespace, now_ms: int) -> Iterator[Outgoing]:
    start = now_ms if args.start is None else args.start
    return market.simulate(
        seed=args.seed,
        feeds=args.feeds,
        symbols=args.symbols,
        start_ms=start,
        end_ms=None if args.duration is None else start + args.duration,
        max_ticks=args.ticks,
        batch=args.batch,
        wait_ms=args.batch_wait_ms,
    )


@dataclass
class Counts:
    lines: int = 0
    malformed: int = 0
    messages: int = 0
    ticks: int = 0
    new: int = 0
    duplicate: int = 0
    refused: int = 0
    """Publishes the full store refused (each published again until stored)."""


def replayed(
    items: Iterable[tuple[int, TickRow | ParseError]],
    feed: str,
    symbol: str,
    counts: Counts,
    *,
    batch: int,
    wait_ms: int,
) -> Iterator[Outgoing]:
    """An MT5 tick export as its EA would have sent it: seq 1, 2, ... over the valid lines."""

    def rows() -> Iterator[tuple[int, str, str, TickRow]]:
        seq = 0
        for number, item in items:
            counts.lines += 1
            if isinstance(item, ParseError):
                counts.malformed += 1
                if counts.malformed <= MAX_REPORTED:
                    tqdm.write(f"line {number}: {item.reason}: {item.detail}", file=sys.stderr)
                continue
            seq += 1
            row = msgspec.structs.replace(item, seq=seq)
            yield row.time_ms, feed, symbol, row

    return market.package(rows(), batch=batch, wait_ms=wait_ms)


class Pacer:
    """When each message may go: event time scaled to wall time, or a tick rate. Event time
    runs from ``start_ms`` (the simulation's start, where the market may still be closed),
    else from the first message's first tick (a replayed export)."""

    def __init__(
        self, speed: float | None, rate: float | None, start_ms: int | None = None
    ) -> None:
        self.speed, self.rate = speed, rate
        self._wall0 = time.monotonic()
        self._event0: int | None = start_ms
        self._ticks = 0

    def delay(self, message: Outgoing) -> float:
        """Seconds to wait before sending ``message`` (0 when it is due)."""
        if self.rate is not None:
            due = self._ticks / self.rate
            self._ticks += len(message.ticks)
        else:
            assert self.speed is not None
            if math.isinf(self.speed):
                return 0.0
            if self._event0 is None:
                self._event0 = message.ticks[0].time_ms
            due = (message.sent_ms - self._event0) / 1000 / self.speed
        return max(0.0, due - (time.monotonic() - self._wall0))


async def publish_paced(
    nc: Client,
    messages: Iterable[Outgoing],
    counts: Counts,
    *,
    namespace: str | None,
    pacer: Pacer,
    window: int,
    timeout_s: float,
    progress: tqdm[None],
) -> None:
    """Publish in order, paced, with at most ``window`` unacknowledged; stop at a failure.

    A refusal by the server (a full store, no stream for the subject, a permission) leaves
    nats-py's ``publish_async`` future pending (nats-io/nats.py#985): when an ack does not
    come in time, that message is published once more synchronously, with the same id, for
    the server's answer; so is every message behind it still unanswered, at once. A full
    store is waited out (``confirm``); any other refusal stops the EA with its reason. No
    stream answering is a refusal only once it lasts ``timeout_s``: a server that has just
    restarted answers so until it has loaded its streams again. A server restarting or out
    of reach is waited out too, as an EA does: a message whose answer did not come while
    the connection was down, or came back, is published again until it comes; no answer
    on a connection that stayed up stops the EA (a subject it may not publish to).
    """
    js = nc.jetstream(publish_async_max_pending=window)
    inflight: collections.deque[tuple[asyncio.Future[PubAck], str, Outgoing]] = collections.deque()
    full = _FullStore()
    outage = _Outage()

    def reconnects() -> int:
        return int(nc.stats["reconnects"])

    async def confirm(subject: str, m: Outgoing) -> PubAck:
        """Publish ``m`` again with its id, until the server stores it (or had it)."""
        pause = FULL_RETRY_S[0]
        no_stream_until: float | None = None
        while True:
            before = reconnects()
            try:
                ack = await js.publish(
                    subject, m.payload, timeout=timeout_s, headers={MSG_ID: m.msg_id}
                )
            except (TimeoutError, OSError) as exc:
                if nc.is_connected and reconnects() == before:
                    raise _failed(subject, exc) from None
                outage.waiting(subject)  # the server restarting or out of reach
                if not isinstance(exc, TimeoutError):  # the write failed: not a wait
                    await asyncio.sleep(OUTAGE_RETRY_S)  # a backoff while reconnecting
                continue
            except NoStreamResponseError as exc:
                now = time.monotonic()
                no_stream_until = no_stream_until or now + timeout_s
                if now >= no_stream_until:
                    raise _failed(subject, exc) from None
                await asyncio.sleep(NO_STREAM_RETRY_S)  # a restarted server loading streams
                continue
            except APIError as exc:
                if exc.err_code not in STORE_FULL:
                    raise _failed(subject, exc) from None
                counts.refused += 1
                full.refused(subject, exc)
                await asyncio.sleep(pause)  # a backoff while the store is full
                pause = min(pause * 2, FULL_RETRY_S[1])
                continue
            except Exception as exc:
                raise _failed(subject, exc) from None
            full.stored()
            outage.over()
            return ack

    async def settle(keep: int) -> None:
        # an ack went missing: the unanswered ones behind it are asked at once, and all of
        # them before anything new is sent, so that the server stores them in order
        stalled = False
        while len(inflight) > (0 if stalled else keep):
            future, subject, m = inflight[0]
            ack: PubAck | None = None
            if future.done() or not stalled:
                try:
                    if not future.done():
                        await asyncio.wait_for(asyncio.shield(future), timeout_s)
                    ack = future.result()
                except (TimeoutError, NoStreamResponseError):
                    stalled = True  # asked again below: no stream may be a server restarting
                except Exception as exc:
                    raise _failed(subject, exc) from None
            if ack is None:
                ack = await confirm(subject, m)
                future.cancel()  # frees its slot of the window
            inflight.popleft()
            counts.messages += 1
            counts.ticks += len(m.ticks)
            if ack.duplicate:
                counts.duplicate += 1
            else:
                counts.new += 1
            progress.update(len(m.ticks))

    try:
        for m in messages:
            wait = pacer.delay(m)
            if wait > PACE_AHEAD_S:
                await settle(0)  # nothing held back while idle: what is sent is stored
                await asyncio.sleep(wait)  # pacing to event time, not synchronisation
            if len(inflight) >= window:
                await settle(window - 1)
            if not nc.is_connected:
                # what was sent before the connection dropped goes again first, in order
                await settle(0)
            subject = subjects.ticks(m.feed, m.symbol, namespace=namespace)
            # nats-py waits for a free slot through a timed wait, which always suspends: a
            # burst would then leave one write per message. A slot is free unless the last
            # acks' callbacks have yet to run; only then is the wait bounded.
            stall = timeout_s if js.publish_async_pending() >= window else None
            try:
                future = await js.publish_async(
                    subject, m.payload, headers={MSG_ID: m.msg_id}, wait_stall=stall
                )
            except OSError:  # the connection lost under the write: asked again, in order
                future = asyncio.get_running_loop().create_future()
                future.set_exception(TimeoutError())
            inflight.append((future, subject, m))
        await settle(0)
    finally:
        for future, _, _ in inflight:
            future.cancel()


def _failed(subject: str, exc: Exception) -> SimFailed:
    return SimFailed(f"publish to {subject} failed: {type(exc).__name__}: {exc}")


class _FullStore:
    """One line when the store starts refusing, one every ``STILL_FULL_EVERY_S`` while it
    does, and one when it stores again."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.attempts = 0
        self._said_at = 0.0

    def refused(self, subject: str, exc: APIError) -> None:
        now = time.monotonic()
        self.attempts += 1
        if self.since is None:
            self.since = self._said_at = now
            _say(
                f"JetStream store full: publish to {subject} refused: {exc.description} "
                f"(err_code {exc.err_code}); publishing it again until there is room, "
                "nothing is dropped"
            )
        elif now - self._said_at >= STILL_FULL_EVERY_S:
            self._said_at = now
            _say(f"JetStream store still full after {now - self.since:.0f} s")

    def stored(self) -> None:
        if self.since is not None:
            _say(
                f"JetStream store has room again after {time.monotonic() - self.since:.1f} s "
                f"and {self.attempts} refused publishes; going on"
            )
            self.since, self.attempts = None, 0


class _Outage:
    """One line when the server stops answering, one every ``STILL_AWAY_EVERY_S`` while it
    does not, and one when it answers again."""

    def __init__(self) -> None:
        self.since: float | None = None
        self._said_at = 0.0

    def waiting(self, subject: str) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = self._said_at = now
            _say(
                f"NATS away (no answer to a publish to {subject}); publishing again with the"
                " same ids until it answers, nothing is dropped"
            )
        elif now - self._said_at >= STILL_AWAY_EVERY_S:
            self._said_at = now
            _say(f"NATS still away after {now - self.since:.0f} s")

    def over(self) -> None:
        if self.since is not None:
            _say(f"NATS answers again after {time.monotonic() - self.since:.1f} s; going on")
            self.since = None


def _say(line: str) -> None:
    tqdm.write(f"{PROG}: {line}", file=sys.stderr)


class _QuietStoreFull(logging.Filter):
    """The connection's log of a refused asynchronous publish: the EA reports a full store
    itself, once, instead of once per message in flight."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(
            isinstance(a, APIError) and a.err_code in STORE_FULL for a in record.args or ()
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides: dict[str, object] = {}
    if args.namespace is not None:
        overrides["namespace"] = args.namespace
    if args.user is not None:
        overrides["nats_user"] = args.user
    if args.password is not None:
        overrides["nats_password"] = args.password
    settings = load(RuntimeSettings, **overrides)
    logging.getLogger("workers.runtime.connection").addFilter(_QuietStoreFull())
    try:
        if settings.namespace is not None:
            subjects.check_name(settings.namespace, "namespace")
    except subjects.SubjectError as exc:
        return _fail(str(exc), 2)  # a bad TICKWIRE_NAMESPACE

    counts = Counts()
    messages: Iterator[Outgoing]
    start_ms: int | None = None
    if args.csv is not None:
        try:
            items = mt5_csv.iter_ticks(
                args.csv, feed=args.feed, symbol=args.symbol, server_time=args.utc_offset
            )
        except (HeaderError, OSError) as exc:
            return _fail(str(exc), 2)
        messages = replayed(
            items, args.feed, args.symbol, counts, batch=args.batch, wait_ms=args.batch_wait_ms
        )
        what = f"{args.csv}"
    else:
        now_ms = time.time_ns() // 1_000_000
        if args.start is None and args.speed is not None and args.speed > 1.0:
            sys.stderr.write(
                f"{PROG}: event time starts now and runs faster than the clock: ticks more than "
                "TICKWIRE_MAX_FUTURE_SKEW_S ahead are refused as future_time; give --start\n"
            )
        messages = simulated(args, now_ms)
        start_ms = now_ms if args.start is None else args.start
        what = f"{len(args.feeds)} feeds x {len(args.symbols)} symbols, seed {args.seed}"
    progress = tqdm(
        total=args.ticks,
        unit="tick",
        desc="ea-sim",
        file=sys.stderr,
        disable=not (sys.stderr.isatty() if args.progress is None else args.progress),
        leave=False,
    )

    async def run() -> None:
        # the shared connect() retries forever, as a worker should; a tool gives up
        deadline = CONNECT_ATTEMPTS * settings.nats_connect_timeout_s
        try:
            nc = await asyncio.wait_for(connect(settings, name="tickwire-ea-sim"), deadline)
        except Exception as exc:
            raise SimFailed(
                f"cannot connect to NATS at {settings.nats_url} within {deadline:g} s: {exc!r}"
            ) from None
        try:
            await publish_paced(
                nc,
                messages,
                counts,
                namespace=settings.namespace,
                pacer=Pacer(args.speed, args.rate, start_ms),
                window=args.window,
                timeout_s=settings.publish_timeout_s,
                progress=progress,
            )
        finally:
            await nc.close()

    failure = None
    try:
        asyncio.run(run())
    except SimFailed as exc:
        failure = str(exc)
    except OSError as exc:
        failure = f"cannot read {args.csv}: {exc}"
    finally:
        progress.close()
    hidden = counts.malformed - MAX_REPORTED
    if hidden > 0:
        sys.stderr.write(f"... and {hidden} more malformed lines\n")
    malformed = f", {counts.malformed} malformed lines skipped" if args.csv is not None else ""
    print(
        f"{what}: {counts.ticks} ticks in {counts.messages} messages published "
        f"({counts.new} new, {counts.duplicate} duplicate){malformed}"
        + (f", {counts.refused} refusals of a full store waited out" if counts.refused else "")
        + (" (stopped)" if failure else "")
    )
    if failure is not None:
        return _fail(failure, 1)
    return 0


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
