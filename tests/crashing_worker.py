"""A worker process for the tests of a crash between publish and ack, run as
``python -m tests.crashing_worker run WORKER`` (``tests.processes.spawn``).

- ``TICKWIRE_TEST_DUPLICATE_WINDOW_S``: the duplicate window of every stream its start-up
  ensures, instead of the specified one, so that a test outlasts it in seconds.
- ``TICKWIRE_TEST_KILLED_AFTER``: a subject prefix. Once JetStream has stored a publish of
  the worker on a subject under it, the process sends itself SIGKILL: it dies after its
  output is stored and before its input is acked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import msgspec
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from contracts import streams
from tests.waiting import eventually
from workers.runtime import publish

CRASHING: Final = "tests.crashing_worker"
"""This module, for ``tests.processes.spawn``."""
WINDOW: float | None = (
    float(os.environ["TICKWIRE_TEST_DUPLICATE_WINDOW_S"])
    if "TICKWIRE_TEST_DUPLICATE_WINDOW_S" in os.environ
    else None
)
ACK_WAIT: float | None = (
    float(os.environ["TICKWIRE_TEST_ACK_WAIT_S"])
    if "TICKWIRE_TEST_ACK_WAIT_S" in os.environ
    else None
)
KILLED_AFTER: str | None = os.environ.get("TICKWIRE_TEST_KILLED_AFTER")


def short_windows(window: float) -> None:
    """Every stream spec, from here on, with a duplicate window of ``window`` seconds (set
    before the worker's module imports ``stream_specs``)."""
    specified = streams.stream_specs

    def stream_specs(**kw: Any) -> list[streams.StreamSpec]:
        return [msgspec.structs.replace(s, duplicate_window=window) for s in specified(**kw)]

    streams.stream_specs = stream_specs


def short_ack_waits(ack_wait: float) -> None:
    """Every consumer spec, from here on, with an ack wait and redelivery delays of
    ``ack_wait`` seconds (set before the worker's modules import ``consumer_specs``)."""
    specified = streams.consumer_specs

    def consumer_specs(**kw: Any) -> list[streams.ConsumerSpec]:
        return [
            msgspec.structs.replace(s, ack_wait=ack_wait, backoff=(ack_wait,) if s.backoff else ())
            for s in specified(**kw)
        ]

    streams.consumer_specs = consumer_specs


def killed_after_publishing_on(prefix: str) -> None:
    """Publishes of the worker, from here on, SIGKILL the process once stored when one of
    their messages is on a subject that starts with ``prefix``."""
    real = publish.Publisher.publish

    async def publish_then_die(
        self: publish.Publisher, messages: Iterable[publish.Outgoing]
    ) -> None:
        todo = list(messages)
        await real(self, todo)
        if any(m.subject.startswith(prefix) for m in todo):
            os.kill(os.getpid(), signal.SIGKILL)

    publish.Publisher.publish = publish_then_die  # type: ignore[method-assign]


async def shorten_windows(js: JetStreamContext, namespace: str, window: float) -> None:
    """The streams of ``namespace``, made or updated with a duplicate window of ``window``."""
    specs = streams.stream_specs(namespace=namespace)
    await streams.ensure(js, [msgspec.structs.replace(s, duplicate_window=window) for s in specs])


async def window_gone_by(js: JetStreamContext, name: str, window: float) -> None:
    """Returns once a duplicate window of ``window`` seconds that was open at the call has
    closed on the server: a stream made for it (``name``, deleted after) with that window
    no longer takes a message id it stored at the call for a repeat."""
    await js.add_stream(
        StreamConfig(
            name=name,
            subjects=[f"window.{name}"],
            duplicate_window=window,
            storage=StorageType.MEMORY,
        )
    )
    try:
        headers = {publish.MSG_ID: "opened"}
        await js.publish(f"window.{name}", b"", headers=headers)

        async def closed() -> bool:
            ack = await js.publish(f"window.{name}", b"", headers=headers)
            return not ack.duplicate

        await eventually(closed, timeout=10 * window + 10, what="the duplicate window closed")
    finally:
        await js.delete_stream(name)


async def killed_after_its_first_publish(
    worker: str, env: dict[str, str], log: Path, prefix: str
) -> None:
    """Run ``worker`` as a process until it has SIGKILLed itself, once JetStream stored its
    first publish on a subject under ``prefix``."""
    from tests.processes import spawn, tail

    killed = spawn(worker, {**env, "TICKWIRE_TEST_KILLED_AFTER": prefix}, log, module=CRASHING)
    assert await asyncio.to_thread(killed.wait, 120) == -signal.SIGKILL, tail(log)


def doubled(messages: list[tuple[str, bytes]]) -> list[str]:
    """The message ids stored more than once among ``(Nats-Msg-Id, payload)`` pairs."""
    return [i for i, n in Counter(msg_id for msg_id, _ in messages).items() if n > 1]


async def stored_messages(js: JetStreamContext, stream: str) -> list[tuple[str, bytes]]:
    """``(Nats-Msg-Id, payload)`` of every message of ``stream``, in order."""
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(stream, seq)
        out.append(((raw.headers or {}).get(publish.MSG_ID, ""), raw.data or b""))
    return out if info.state.messages else []


if __name__ == "__main__":
    if WINDOW is not None:
        short_windows(WINDOW)
    if ACK_WAIT is not None:
        short_ack_waits(ACK_WAIT)
    if KILLED_AFTER:
        killed_after_publishing_on(KILLED_AFTER)
    from workers.cli import main

    sys.exit(main(sys.argv[1:]))
