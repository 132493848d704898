"""Publishing to JetStream: deterministic ``Nats-Msg-Id`` on every message, acks awaited.

``publish()`` returns only when JetStream has stored (or de-duplicated) every message of the
batch, so a worker acks its input after it. A publish that fails or times out raises
``PublishError``: the caller's input is redelivered and published again with the same ids,
which the stream's duplicate window turns into no-ops.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import Final, NamedTuple

from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError

from workers.runtime.errors import TransientError
from workers.runtime.metrics import WorkerMetrics

MSG_ID: Final = "Nats-Msg-Id"
MAX_PENDING: Final = 4000
"""Publishes awaiting their ack, per JetStream context (``publish_async_max_pending``)."""


class Outgoing(NamedTuple):
    subject: str
    payload: bytes
    msg_id: str
    headers: dict[str, str] | None = None


class PublishError(TransientError):
    """JetStream did not confirm a publish in time; safe to retry with the same ids."""


class Publisher:
    def __init__(self, js: JetStreamContext, metrics: WorkerMetrics, timeout_s: float) -> None:
        self._js = js
        self._metrics = metrics
        self._timeout_s = timeout_s

    async def publish(self, messages: Iterable[Outgoing]) -> list[PubAck]:
        """Publish all, wait for every ack. Returns the acks in order."""
        futures: list[asyncio.Future[PubAck]] = []
        sent: list[Outgoing] = []
        try:
            js = self._js
            for m in messages:
                sent.append(m)
                headers = {MSG_ID: m.msg_id}
                if m.headers:
                    headers.update(m.headers)
                # a time limit on the wait for a free slot costs a task per publish in
                # nats-py (several times the publish itself): only ask for one when full
                stall = None if js.publish_async_pending() < MAX_PENDING else self._timeout_s
                futures.append(
                    await js.publish_async(m.subject, m.payload, headers=headers, wait_stall=stall)
                )
            if not futures:
                return []
            acks = await asyncio.wait_for(asyncio.gather(*futures), self._timeout_s)
        except Exception as exc:
            # the timeout cancelled the gather and with it every future still waiting
            unanswered = [
                m for f, m in zip(futures, sent, strict=False) if not f.done() or f.cancelled()
            ]
            for f in futures:
                f.cancel()
            self._metrics.publish_failures.labels(self._metrics.worker).inc()
            why = repr(exc)
            if isinstance(exc, TimeoutError) and unanswered:
                why = await self._why(unanswered[0], len(unanswered))
            raise PublishError(f"publish of {len(futures)} messages failed: {why}") from exc
        for stream, n in Counter(ack.stream for ack in acks).items():
            self._metrics.messages_out.labels(self._metrics.worker, stream).inc(n)
        return acks

    async def _why(self, first: Outgoing, unanswered: int) -> str:
        """The server's answer for an unanswered publish.

        A publish JetStream refuses (a full store, for one) leaves nats-py's ``publish_async``
        future pending, so a refusal looks like a timeout. Publishing the first unanswered
        message again, with its id and a plain request, gets the reason; stored now, it is
        stored once (the id) and the batch is tried again anyway.
        """
        headers = {MSG_ID: first.msg_id, **(first.headers or {})}
        try:
            await self._js.publish(
                first.subject, first.payload, timeout=self._timeout_s, headers=headers
            )
        except APIError as exc:
            return (
                f"{unanswered} unanswered; JetStream refused {first.subject}: "
                f"{exc.description} (err_code {exc.err_code})"
            )
        except Exception as exc:
            return f"{unanswered} unanswered; publishing {first.subject} again: {exc!r}"
        return f"{unanswered} not acknowledged within {self._timeout_s:g} s"
