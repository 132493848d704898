"""``tickwire subscribers add | list | remove | rewind`` and ``tickwire subscribe NAME``.

Arguments are checked before anything is asked of the server; a bad one, or a subscriber
that does not exist (or already does, for ``add``), gives one line and exit code 2, and no
consumer is changed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo

from contracts import subjects
from contracts.messages import Signal
from workers.cli import fail
from workers.runtime.connection import connect_once
from workers.runtime.settings import RuntimeSettings, load
from workers.signal_publisher import delivery

T = TypeVar("T")


MIN_EPOCH_MS: Final = 10**11
"""A bare ``--from`` below this (1973-03-03 in ms) is refused as ambiguous: epoch seconds
(10 digits) or an ISO basic date (``20250303``) read as milliseconds would be January 1970,
and every signal would come again."""


def start_time(text: str) -> dt.datetime:
    """``--from``: an ISO time (UTC when it has no offset) or epoch milliseconds from
    ``MIN_EPOCH_MS`` on, not after now: a later one would deliver nothing again (and one past
    2262, beyond the server's nanoseconds, would be taken for the stream's start)."""
    if text.isascii() and text.isdigit() and int(text) < MIN_EPOCH_MS:
        fail(
            f"--from: {text} is ambiguous (epoch seconds? a date?): give an ISO time "
            "or epoch milliseconds (13 digits)"
        )
    try:
        if text.isdigit():
            value = dt.datetime.fromtimestamp(int(text) / 1000, dt.UTC)
        else:
            value = dt.datetime.fromisoformat(text)
            value = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
            value = value.astimezone(dt.UTC)  # in UTC's range too (9999-12-31 at -14:00 is not)
    except (ValueError, OverflowError, OSError):
        fail(f"--from: not an ISO time or epoch milliseconds: {text!r}")
    if value > dt.datetime.now(dt.UTC):
        fail(f"--from: {value.isoformat()} is in the future: nothing would come again")
    return value


def _with_js(name: str, action: Callable[[JetStreamContext, str | None], Awaitable[T]]) -> T:
    settings = load(RuntimeSettings)

    async def go() -> T:
        try:
            nc = await connect_once(settings, f"tickwire-{name}")
        except (TimeoutError, OSError) as exc:
            fail(f"{name}: NATS at {settings.nats_url} did not answer: {exc or 'timed out'}")
        try:
            return await action(nc.jetstream(), settings.namespace)
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except delivery.SubscriberError as exc:
        fail(str(exc))


def run(args: argparse.Namespace) -> int:
    """``tickwire subscribers ...``."""
    ns = load(RuntimeSettings).namespace
    try:
        if args.action != "list":
            subjects.check_name(args.name, "subscriber")
        if args.action == "add":
            delivery.check_free(args.name)
        if args.action == "add" and args.filter is not None:
            subjects.check_filter(subjects.SIGNALS, args.filter, namespace=ns)
    except (subjects.SubjectError, delivery.SubscriberError) as exc:
        fail(str(exc))
    if args.action == "add":
        info = _with_js(
            "subscribers",
            lambda js, ns: delivery.add(js, args.name, filter_subject=args.filter, namespace=ns),
        )
        print(f"added {info.name} on {info.stream_name} filter {_filters(info)}")
    elif args.action == "remove":
        _with_js("subscribers", lambda js, ns: delivery.remove(js, args.name, namespace=ns))
        print(f"removed {args.name}")
    elif args.action == "rewind":
        start = start_time(args.start)
        info = _with_js(
            "subscribers", lambda js, ns: delivery.rewind(js, args.name, start, namespace=ns)
        )
        print(f"rewound {info.name}: signals from {start.isoformat()} come again")
    else:
        infos = _with_js("subscribers", lambda js, ns: delivery.listing(js, namespace=ns))
        print(f"{'name':24} {'filter':36} {'pending':>8} {'unacked':>8} {'redelivered':>11}")
        for i in infos:
            print(
                f"{i.name:24} {_filters(i):36} {i.num_pending:>8} "
                f"{i.num_ack_pending:>8} {i.num_redelivered:>11}"
            )
    return 0


def _filters(info: ConsumerInfo) -> str:
    c = info.config
    return ",".join(c.filter_subjects or ([c.filter_subject] if c.filter_subject else ["all"]))


def _line(signal: Signal, status: str) -> str:
    return (
        f"{status} {signal.signal_id} {signal.side.value} strength={signal.strength:g} "
        f"ref={signal.ref_price!r} expires_ms={signal.expires_ms}"
        + (f" corrects={signal.corrects}" if signal.corrects else "")
    )


def subscribe(args: argparse.Namespace) -> int:
    """``tickwire subscribe NAME``: print each signal and ack it, until Ctrl-C or SIGTERM."""
    try:
        subjects.check_name(args.name, "subscriber")
    except subjects.SubjectError as exc:
        fail(str(exc))

    async def act(signal: Signal) -> None:
        print(_line(signal, "SIGNAL"), flush=True)

    async def expired(signal: Signal) -> None:
        print(_line(signal, "EXPIRED not actionable"), flush=True)

    async def go(js: JetStreamContext, ns: str | None) -> None:
        await delivery.check(js, args.name, namespace=ns)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sys.stderr.write(f"subscriber {args.name}: waiting for signals (Ctrl-C stops)\n")
        await delivery.subscribe(js, args.name, act=act, expired=expired, stop=stop, namespace=ns)

    _with_js("subscribe", go)
    return 0
