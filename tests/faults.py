"""Faults injected on the client's side of a real server."""

from __future__ import annotations

from typing import Any

import pytest
from nats.aio.msg import Msg

from workers.runtime.pull import PullSource, ack_numbers


def losing_source(lose: set[int], lost: list[int]) -> type[PullSource]:
    """A pull source that never receives the first delivery of the stream seqs in ``lose``
    (appended to ``lost`` as they go by), as when a consumer leader dies with them in
    flight: the server counts them delivered and sends them again only after their ack
    wait, behind later ones."""

    class LosingSource(PullSource):
        async def _on_msg(self, msg: Msg) -> None:
            if msg.reply:
                deliveries, seq, _ = ack_numbers(msg.reply)
                if deliveries == 1 and seq in lose:
                    lost.append(seq)
                    return
            await super()._on_msg(msg)

    return LosingSource


def fails_first(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, error: Exception
) -> list[int]:
    """The coroutine method ``owner.name`` raises ``error`` on its first call (a dependency
    not ready yet, a replay that stalled) and works from then on. Returns the list the calls
    are numbered into."""
    calls: list[int] = []
    real = getattr(owner, name)

    async def first_fails(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            raise error
        return await real(*args, **kwargs)

    monkeypatch.setattr(owner, name, first_fails)
    return calls
