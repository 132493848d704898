"""A batch's acks, or a batch's publishes, handed to the connection in one write.

nats-py frames and queues each message on its own: ``publish`` checks the subject and the
reply with a regular expression, builds the header block byte by byte, appends the frame
to the outgoing queue and signals the flusher, 2 µs for an ack and 6 µs for a publish with
a message id. A worker acks every message it takes and publishes one or more for most, so
that was as much as the worker's own work on a candle. Here the frames of a whole batch,
the bytes ``publish`` would send for each, are joined and queued once through the call
``publish`` itself ends in (``Client._send_command``), then the flusher is signalled as
``publish`` does.

What goes into a frame is checked once per batch, not once per message: subjects and
replies must not hold whitespace (it would end the frame's header line), header values
no line break, payloads must fit the server's limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from nats.aio.client import Client
from nats.errors import (
    BadHeaderError,
    BadSubjectError,
    ConnectionClosedError,
    ConnectionDrainingError,
    MaxPayloadError,
    OutboundBufferLimitError,
)

_WHITESPACE: Final = re.compile(r"\s")
_LINE_BREAK: Final = re.compile(r"[\r\n]")
_HEADER_KEY: Final = re.compile(r"[!-9;-~]+")
"""A header name: printable ASCII without ':' (RFC 7230 token characters and more)."""
_HEADER_LINE: Final = "NATS/1.0\r\n"


def check_subjects(subjects: Sequence[str]) -> None:
    """BadSubjectError if any of ``subjects`` is empty or holds whitespace."""
    if not all(subjects) or _WHITESPACE.search("".join(subjects)):
        raise BadSubjectError


def header_block(headers: Mapping[str, str]) -> bytes:
    """The NATS header block of ``headers`` (what ``publish(headers=...)`` sends)."""
    lines = [_HEADER_LINE]
    for key, value in headers.items():
        key = key.strip()
        if not key:
            continue
        if not _HEADER_KEY.fullmatch(key) or _LINE_BREAK.search(value):
            raise BadHeaderError(key)
        lines.append(f"{key}: {value.strip()}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def id_header_blocks(ids: Sequence[str]) -> list[bytes]:
    """``header_block({"Nats-Msg-Id": id})`` of each id, checked together."""
    if _LINE_BREAK.search("".join(ids)):
        raise BadHeaderError("Nats-Msg-Id")
    return [f"NATS/1.0\r\nNats-Msg-Id: {i.strip()}\r\n\r\n".encode() for i in ids]


def hpub_frames(
    max_payload: int,
    subjects: Sequence[str],
    replies: Sequence[str],
    headers: Sequence[bytes],
    payloads: Sequence[bytes],
) -> list[bytes]:
    """``HPUB`` frames, three buffers a message: the command line with the header block,
    the payload and the line end."""
    check_subjects(subjects)
    check_subjects(replies)
    out: list[bytes] = []
    for subject, reply, hdr, payload in zip(subjects, replies, headers, payloads, strict=True):
        size = len(payload)
        if size > max_payload:
            raise MaxPayloadError
        n = len(hdr)
        out += (f"HPUB {subject} {reply} {n} {n + size}\r\n".encode() + hdr, payload, b"\r\n")
    return out


def acks(replies: Iterable[str], body: bytes) -> bytes:
    """One ``PUB`` of ``body`` to each of ``replies`` (ack subjects the server gave)."""
    text = body.decode()
    return "".join(f"PUB {r} {len(body)}\r\n{text}\r\n" for r in replies).encode()


async def send(nc: Client, frames: bytes | Sequence[bytes]) -> None:
    """Queue ``frames`` on the connection as ``publish`` queues one message, and let the
    flusher write them."""
    if nc.is_closed:
        raise ConnectionClosedError
    if nc.is_draining_pubs:
        raise ConnectionDrainingError
    data = frames if isinstance(frames, bytes) else b"".join(frames)
    if not data:
        return
    if not nc.is_connected:
        limit = nc._max_pending_size
        if limit <= 0 or len(data) + nc._pending_data_size > limit:
            # reconnecting, and what is buffered for after it would overflow
            raise OutboundBufferLimitError
    await nc._send_command(data)
    flush = nc._flush_queue
    if flush is not None and flush.empty():
        await nc._flush_pending()
