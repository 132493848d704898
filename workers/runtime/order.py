"""Deliveries lost on their way, found by the consumer's delivery sequence.

A stateful worker applies its input in stream order and takes a message at or below the
last stream sequence it applied as one it has applied already (a redelivery). That holds
only while no delivery is lost between the server and the worker. One can be: a consumer
leader that dies with messages in flight, a client that drops messages it cannot buffer.
The server counts such a message as delivered and sends it again only after its ack wait,
behind the later ones the worker has applied meanwhile; taken for a redelivery, it would
be acked without ever being applied.

Every delivery carries the consumer's delivery sequence, one more than the delivery
before (a redelivery takes a number of its own too). A jump says deliveries were lost;
the next message whose stream sequence leaves a hole after the last one received then has
that hole read back from the stream (the worker's filter, a short-lived consumer without
acks) and handled first, in stream order. When the lost message itself comes again, it
finds itself applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from workers.runtime.pull import ack_numbers


class Hole(NamedTuple):
    """Stream sequences ``first`` up to ``before`` (not included) may hold messages never
    received; they go in front of message ``at`` of the batch."""

    at: int
    first: int
    before: int


class DeliveryOrder:
    """What a consumer has delivered to this process, as far as its deliveries say."""

    __slots__ = ("consumer_seq", "lost", "stream_seq")

    def __init__(self, stream_seq: int, consumer_seq: int) -> None:
        """Start from the consumer's ``delivered`` sequences (its info at start-up)."""
        self.stream_seq = stream_seq
        """The highest stream sequence received (or read back)."""
        self.consumer_seq = consumer_seq
        """The highest delivery sequence received."""
        self.lost = False
        """Deliveries went missing and the first delivery after them has not come yet."""

    def holes(self, replies: Sequence[str]) -> list[Hole]:
        """The holes in front of the messages of a batch (their reply subjects, in the order
        received), as deliveries lost before them leave them."""
        n = len(replies)
        if not n:
            return []
        if not self.lost:
            # the common case, from two of the batch's subjects: delivery seqs only count
            # up, so n deliveries numbered from the next one on to n more are all there
            deliveries, sseq, dseq = ack_numbers(replies[-1])
            if (
                deliveries == 1
                and dseq == self.consumer_seq + n
                and (n == 1 or ack_numbers(replies[0])[2] == self.consumer_seq + 1)
            ):
                # a redelivery among them is of a message received before: the last, a
                # first delivery, is the furthest into the stream
                self.consumer_seq = dseq
                self.stream_seq = max(self.stream_seq, sseq)
                return []
        out: list[Hole] = []
        for i, reply in enumerate(replies):
            deliveries, sseq, dseq = ack_numbers(reply)
            if dseq > self.consumer_seq:
                if dseq > self.consumer_seq + 1:
                    self.lost = True
                self.consumer_seq = dseq
            if sseq > self.stream_seq:
                if self.lost and sseq > self.stream_seq + 1:
                    out.append(Hole(i, self.stream_seq + 1, sseq))
                if deliveries == 1:
                    # first deliveries come in stream order: whatever was lost before
                    # this one lies below it, in the hole just read back
                    self.lost = False
                self.stream_seq = sseq
        return out
