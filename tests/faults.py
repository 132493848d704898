"""Faults injected on the client's side of a real server."""

from __future__ import annotations

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
