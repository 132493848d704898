"""``tickwire dlq list | show | requeue | purge``: the dead letters of every worker.

A dead letter (``contracts.messages.DeadLetter``) sits in the DLQ stream on ``dlq.<worker>``
and is addressed by its DLQ stream sequence. Requeue publishes its payload (or a fixed one,
validated first against the original subject's message type) with its original headers
back to its original subject, and deletes the dead letter only after that publish is acked.

The requeued message gets a fresh ``Nats-Msg-Id``, ``requeue|<DLQ stream>|<seq>``: the
original id is still in the duplicate window of the original stream and would be dropped.
It is deterministic, so a requeue repeated after a crash between publish and delete is
dropped by the server as a duplicate instead of doubled. The original id travels in
``Tickwire-Original-Msg-Id``, the producer's even after a second requeue.

A signal is never requeued, nor a dead letter without a message (made from a delivery-limit
advisory about a message already gone from its stream). A batch requeue leaves those where
they are, names them, and requeues the others.

Bad arguments (unknown worker, unknown sequence, a message that is not a dead letter, an
invalid payload file, NATS not answering) give one line and exit code 2, and nothing is
changed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NotFoundError
from tqdm import tqdm

from contracts import subjects
from contracts.codec import Codec, ContractError
from contracts.messages import Candle, DeadLetter, FeatureVector, Score, Signal, TickInput
from contracts.streams import DLQ, SIGNALS, stream_name
from workers.runtime.connection import connect_once
from workers.runtime.publish import REQUEUED_FOR
from workers.runtime.settings import RuntimeSettings, load
from workers.status import render

ORIGINAL_ID: Final = "Tickwire-Original-Msg-Id"
REQUEUED_FROM: Final = "Tickwire-Requeued-From"
"""``<DLQ stream>:<seq>`` of the dead letter a requeued message came from."""
MSG_ID: Final = "Nats-Msg-Id"
# Publish expectations of the first attempt would refuse a republish; they are not data.
_DROPPED_HEADERS: Final = ("Nats-Expected-", "Nats-Rollup")

MESSAGE_TYPES: Final[dict[str, Any]] = {
    subjects.TICKS: TickInput,
    subjects.CANDLES: Candle,
    subjects.FEATURES: FeatureVector,
    subjects.SCORES: Score,
    subjects.SIGNALS: Signal,
}
"""What may be published on each domain's subjects."""

_letters: Final[Codec[DeadLetter]] = Codec(DeadLetter, max_bytes=8 << 20)


class DlqError(Exception):
    """A dead-letter command refused its arguments; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Letter:
    seq: int
    """Sequence in the DLQ stream: how a dead letter is named."""
    letter: DeadLetter
    subject: str = ""
    """Its subject in the DLQ stream: ``dlq.<worker>``."""

    @property
    def owner(self) -> str:
        """Whose dead letter it is, as ``--worker`` takes it: the worker, or for a signal a
        subscriber never acked, ``subscribers/<name>``."""
        if self.subject.rsplit(".", 1)[-1] == SUBSCRIBERS:
            return f"{SUBSCRIBERS}/{self.letter.worker}"
        return self.letter.worker


@dataclass(frozen=True, slots=True)
class Summary:
    worker: str
    reason: str
    count: int
    first_ms: int
    last_ms: int


def summarize(letters: Sequence[Letter]) -> list[Summary]:
    """Dead letters counted per worker and reason, with the first and last refusal time."""
    groups: dict[tuple[str, str], list[int]] = {}
    for item in letters:
        d = item.letter
        groups.setdefault((item.owner, d.reason), []).append(d.failed_at_ms)
    return [
        Summary(worker, reason, len(times), min(times), max(times))
        for (worker, reason), times in sorted(groups.items())
    ]


def requeue_id(stream: str, seq: int) -> str:
    return f"requeue|{stream}|{seq}"


def requeue_headers(letter: DeadLetter, stream: str, seq: int) -> dict[str, str]:
    """The original headers, a fresh message id, where the message came back from, and for
    whom: the other consumers of the subject took the original and pass it by. The original
    id is the producer's, also when a requeued message is refused and requeued again."""
    headers = {
        k: v
        for k, v in letter.headers.items()
        if k != MSG_ID and not k.startswith(_DROPPED_HEADERS)
    }
    original = letter.headers.get(ORIGINAL_ID) or letter.headers.get(MSG_ID)
    if original is not None:
        headers[ORIGINAL_ID] = original
    headers[REQUEUED_FROM] = f"{stream}:{seq}"
    headers[REQUEUED_FOR] = letter.worker
    headers[MSG_ID] = requeue_id(stream, seq)
    return headers


def check_payload(subject: str, payload: bytes) -> None:
    """Refuse a payload that is not a valid message for ``subject`` (DlqError)."""
    try:
        parsed = subjects.parse(subject)
    except subjects.SubjectError as exc:
        raise DlqError(f"cannot validate a payload for {subject!r}: {exc}") from None
    tp = MESSAGE_TYPES[parsed.domain]
    try:
        message: object = Codec[object](tp).decode(payload)
    except ContractError as exc:
        raise DlqError(f"payload is not valid for {subject}: {exc}") from None
    # a message for another series would only be refused again by the worker
    for field, want in (("feed", parsed.feed), ("symbol", parsed.symbol), ("tf", parsed.tf)):
        got = getattr(message, field, None)
        if got is not None and want is not None and got != want:
            raise DlqError(f"payload {field} {got!r} does not belong on {subject}")


def pretty(payload: bytes) -> str:
    """JSON indented; anything else as Python shows bytes."""
    try:
        return msgspec.json.format(payload, indent=2).decode()
    except (msgspec.DecodeError, UnicodeDecodeError):
        return repr(payload)


def when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


SUBSCRIBERS: Final = "subscribers"
"""Signals a subscriber never acked (``workers.signal_publisher.delivery``): listed, shown
and purged here, never requeued (that would send them to every subscriber again; use
``tickwire subscribers rewind`` for one)."""


def known_worker(worker: str) -> str:
    """A worker's name, ``subscribers`` (every subscriber) or ``subscribers/<name>``."""
    from workers.cli import WORKERS

    head, slash, name = worker.partition("/")
    if head == SUBSCRIBERS and slash:
        try:
            subjects.check_name(name, "subscriber")
        except subjects.SubjectError as exc:
            raise DlqError(str(exc)) from None
        return worker
    if worker not in WORKERS and worker != SUBSCRIBERS:
        known = ", ".join(sorted([*WORKERS, SUBSCRIBERS, f"{SUBSCRIBERS}/<name>"]))
        raise DlqError(f"unknown worker {worker!r}: one of {known}")
    return worker


class DeadLetters:
    """The DLQ stream of one namespace (live when None)."""

    def __init__(self, js: JetStreamContext, namespace: str | None = None) -> None:
        self.js = js
        self.namespace = namespace
        self.stream = stream_name(DLQ, namespace=namespace)

    def subject(self, worker: str | None) -> str:
        if worker is None:
            return subjects.wildcard(subjects.DLQ, namespace=self.namespace)
        return subjects.dlq(worker.partition("/")[0], namespace=self.namespace)

    async def scan(self, worker: str | None = None, reason: str | None = None) -> list[Letter]:
        """Every dead letter (of ``worker``, with ``reason``), in stream order."""
        try:
            state = (await self.js.stream_info(self.stream)).state
        except NotFoundError:
            raise DlqError(f"no dead-letter stream {self.stream}") from None
        out: list[Letter] = []
        seq, last = state.first_seq, state.last_seq
        filter_subject = self.subject(worker)
        with tqdm(total=state.messages, desc="reading dead letters", disable=None) as bar:
            while state.messages and seq <= last:
                try:
                    msg = await self.js.get_msg(self.stream, seq, subject=filter_subject, next=True)
                except NotFoundError:
                    break
                seq = (msg.seq or seq) + 1
                bar.update()
                if msg.seq is None or msg.seq > last:
                    break
                try:
                    letter = _letters.decode(msg.data or b"")
                except ContractError:
                    continue  # not a dead letter: someone else's message on dlq.*
                item = Letter(msg.seq, letter, msg.subject or "")
                if reason is not None and letter.reason != reason:
                    continue
                if worker is None or "/" not in worker or item.owner == worker:
                    out.append(item)
        return out

    async def get(self, seq: int) -> Letter:
        try:
            msg = await self.js.get_msg(self.stream, seq)
        except NotFoundError:
            raise DlqError(f"no message {seq} in {self.stream}") from None
        try:
            return Letter(seq, _letters.decode(msg.data or b""), msg.subject or "")
        except ContractError as exc:
            raise DlqError(f"message {seq} of {self.stream} is not a dead letter: {exc}") from None

    def refusal(self, item: Letter) -> str | None:
        """Why this dead letter cannot be requeued, or None."""
        d = item.letter
        if item.subject == subjects.dlq(SUBSCRIBERS, namespace=self.namespace):
            return (
                "is a signal a subscriber did not ack: requeueing it would send it to every"
                " subscriber; use tickwire subscribers rewind"
            )
        if d.stream == stream_name(SIGNALS, namespace=self.namespace):
            return (
                f"is a signal ({d.worker} did not take it): requeueing it would send it to"
                " every subscriber again"
            )
        if not d.subject:
            # a delivery-limit advisory about a message already gone from its stream
            return (
                f"has no message to requeue: seq {d.stream_seq or '-'} was no longer in"
                f" {d.stream or 'its stream'} when it was dead-lettered (purge it)"
            )
        return None

    async def requeue(self, item: Letter, payload: bytes | None = None) -> PubAck:
        """Publish to the original subject; delete the dead letter once that is acked."""
        d = item.letter
        why = self.refusal(item)
        if why is not None:
            raise DlqError(f"dead letter {item.seq} {why}")
        ack = await self.js.publish(
            d.subject,
            d.payload if payload is None else payload,
            headers=requeue_headers(d, self.stream, item.seq),
        )
        await self.js.delete_msg(self.stream, item.seq)
        return ack

    async def delete(self, items: Sequence[Letter], what: str) -> int:
        for item in tqdm(items, desc=what, unit="msg", disable=None):
            await self.js.delete_msg(self.stream, item.seq)
        return len(items)


# --- the command -------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    from workers.cli import fail

    fail(f"dlq: {message}")


def list_table(rows: Sequence[Summary]) -> str:
    lines = render(
        ("worker", "reason", "count", "first", "last"),
        [(r.worker, r.reason, str(r.count), when(r.first_ms), when(r.last_ms)) for r in rows],
        left=2,
    )
    if not rows:
        lines.append("(no dead letters)")
    return "\n".join(lines)


def show_text(item: Letter, stream: str) -> str:
    d = item.letter
    lines = [
        f"seq:         {item.seq} ({stream})",
        f"worker:      {d.worker}",
        f"reason:      {d.reason}",
        f"detail:      {d.detail}",
        f"subject:     {d.subject}",
        f"from:        {d.stream or '-'} seq {d.stream_seq or '-'}",
        f"deliveries:  {d.deliveries or '-'}",
        f"failed at:   {when(d.failed_at_ms)} UTC",
        "headers:",
        *(f"  {k}: {v}" for k, v in sorted(d.headers.items())),
        f"payload ({len(d.payload)} bytes):",
        pretty(d.payload),
    ]
    return "\n".join(lines)


async def _run(args: argparse.Namespace, nc: Client) -> str:
    dl = DeadLetters(nc.jetstream(), args.namespace)
    action = args.action
    worker = None if getattr(args, "worker", None) is None else known_worker(args.worker)
    reason: str | None = getattr(args, "reason", None)
    if action == "list":
        return list_table(summarize(await dl.scan(worker, reason)))
    if action == "show":
        return show_text(await dl.get(args.seq), dl.stream)
    if action == "requeue" and args.seq is not None:
        item = await dl.get(args.seq)
        payload = None
        why = dl.refusal(item)
        if why is not None:
            raise DlqError(f"dead letter {item.seq} {why}")
        if args.payload_file is not None:
            payload = _read(args.payload_file)
            check_payload(item.letter.subject, payload)
        ack = await dl.requeue(item, payload)
        again = " (already requeued: dropped as a duplicate)" if ack.duplicate else ""
        return f"requeued {item.seq} to {item.letter.subject} as {ack.stream} seq {ack.seq}{again}"
    assert worker is not None
    items = await dl.scan(worker, reason)
    if action == "requeue":
        if not items:
            raise DlqError(f"no dead letters of {worker} with reason {reason!r}")
        # those that cannot be requeued stay, and do not stop the others
        judged = [(item, dl.refusal(item)) for item in items]
        left = [(item.seq, why) for item, why in judged if why is not None]
        items = [item for item, why in judged if why is None][: args.limit]
        if not items:
            seq, why = left[0]
            raise DlqError(f"none of {worker} with reason {reason!r} can be requeued: {seq} {why}")
        done = 0
        try:
            for item in tqdm(items, desc="requeue", unit="msg", disable=None):
                await dl.requeue(item)
                done += 1
        except (NatsError, TimeoutError) as exc:
            sys.stderr.write(f"tickwire: dlq: requeued {done} of {len(items)}, then: {exc!r}\n")
            raise SystemExit(1) from None
        return "\n".join(
            [
                f"requeued {done} dead letters of {worker} ({reason})",
                *(f"left dead letter {seq}: it {why}" for seq, why in left),
            ]
        )
    scope = worker if reason is None else f"{worker} with reason {reason!r}"
    if not items:
        raise DlqError(f"no dead letters of {scope}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise DlqError(f"would purge {len(items)} dead letters of {scope}; add --yes")
        answer = await asyncio.to_thread(
            input, f"purge {len(items)} dead letters of {scope}? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            return "nothing purged"
    # exactly those counted: a message there that is not a dead letter this tickwire reads
    # (another schema version) stays, and so do dead letters that came after the count
    n = await dl.delete(items, "purge")
    return f"purged {n} dead letters of {scope}"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DlqError(f"cannot read payload file {path}: {exc.strerror or exc}") from None


def check_args(args: argparse.Namespace) -> None:
    """What argparse cannot say: which options go together."""
    if args.action == "requeue":
        single = args.seq is not None
        if single and (args.worker or args.reason or args.limit is not None):
            raise DlqError("requeue takes SEQ, or --worker and --reason, not both")
        if not single and not (args.worker and args.reason):
            raise DlqError("requeue needs SEQ, or --worker W --reason R")
        if not single and args.payload_file is not None:
            raise DlqError("--payload-file fixes one dead letter: give its SEQ")
    if args.namespace is not None:
        try:
            subjects.check_name(args.namespace, "namespace")
        except subjects.SubjectError as exc:
            raise DlqError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Run one ``tickwire dlq`` action; refusals become one line and exit code 2."""
    settings = load(RuntimeSettings)
    if args.namespace is None:
        args.namespace = settings.namespace  # TICKWIRE_NAMESPACE, as for every command

    async def go() -> str:
        try:
            nc = await connect_once(settings, "tickwire-dlq")
        except (TimeoutError, OSError) as exc:
            raise DlqError(f"NATS at {settings.nats_url} did not answer: {exc!r}") from None
        try:
            return await _run(args, nc)
        except NatsError as exc:
            raise DlqError(f"NATS refused: {exc!r}") from None
        finally:
            await nc.close()

    try:
        check_args(args)
        print(asyncio.run(go()))
    except DlqError as exc:
        _fail(str(exc))
    return 0
