"""Lost deliveries are told apart from redeliveries by the consumer's delivery sequence."""

from __future__ import annotations

from workers.runtime.order import DeliveryOrder, Hole


def _reply(sseq: int, dseq: int, deliveries: int = 1) -> str:
    return f"$JS.ACK.TICKS.candle-ingest.{deliveries}.{sseq}.{dseq}.1763830000000000000.0"


def _holes(order: DeliveryOrder, *deliveries: tuple[int, int, int]) -> list[Hole]:
    return order.holes([_reply(s, d, n) for s, d, n in deliveries])


def test_deliveries_in_order_leave_no_hole() -> None:
    order = DeliveryOrder(stream_seq=10, consumer_seq=4)
    assert _holes(order, (11, 5, 1), (12, 6, 1), (13, 7, 1)) == []
    assert (order.stream_seq, order.consumer_seq, order.lost) == (13, 7, False)


def test_a_filtered_consumer_skips_stream_seqs_without_losing_anything() -> None:
    # another subject's messages sit between these: stream seqs jump, delivery seqs do not
    order = DeliveryOrder(stream_seq=0, consumer_seq=0)
    assert _holes(order, (2, 1, 1), (5, 2, 1), (9, 3, 1)) == []


def test_lost_deliveries_leave_a_hole_before_the_next_message() -> None:
    order = DeliveryOrder(stream_seq=100, consumer_seq=50)
    # 101..105 (deliveries 51..55) were lost; 106 arrives as delivery 56
    assert _holes(order, (106, 56, 1), (107, 57, 1)) == [Hole(at=0, first=101, before=106)]
    assert not order.lost


def test_a_loss_seen_on_a_redelivery_is_filled_at_the_next_first_delivery() -> None:
    order = DeliveryOrder(stream_seq=100, consumer_seq=50)
    # 101..105 lost (51..55); then 90 is redelivered (56), then 106 comes (57)
    assert _holes(order, (90, 56, 2)) == []
    assert order.lost
    assert _holes(order, (106, 57, 1)) == [Hole(at=0, first=101, before=106)]
    assert not order.lost


def test_lost_messages_redelivered_out_of_order_leave_a_hole() -> None:
    order = DeliveryOrder(stream_seq=100, consumer_seq=50)
    # 101..103 lost (51..53); with no new message, 103 and then 101 come again first
    holes = _holes(order, (103, 54, 2), (101, 55, 2), (102, 56, 2))
    assert holes == [Hole(at=0, first=101, before=103)]


def test_a_new_leader_that_sends_again_what_was_received_leaves_no_hole() -> None:
    # the new leader's state was behind: it delivers 99 and 100 again with their old numbers
    order = DeliveryOrder(stream_seq=100, consumer_seq=50)
    assert _holes(order, (99, 49, 1), (100, 50, 1), (101, 51, 1)) == []


def test_the_newer_ack_subject_form_is_read_too() -> None:
    order = DeliveryOrder(stream_seq=1, consumer_seq=1)
    reply = "$JS.ACK.hub.ACCHASH.TICKS.candle-ingest.1.9.5.1763830000000000000.0.tok"
    assert order.holes([reply]) == [Hole(at=0, first=2, before=9)]


def test_a_whole_batch_in_order_with_a_redelivery_among_it() -> None:
    order = DeliveryOrder(stream_seq=100, consumer_seq=50)
    assert _holes(order, (101, 51, 1), (97, 52, 2), (102, 53, 1)) == []
    assert (order.stream_seq, order.consumer_seq) == (102, 53)


def test_a_batch_that_counts_right_but_starts_with_old_numbers_is_looked_at_closely() -> None:
    # a new leader sends 100 again as delivery 50, then 102 as 53: 51 and 52 were lost
    order = DeliveryOrder(stream_seq=100, consumer_seq=50)
    holes = _holes(order, (100, 50, 1), (101, 51, 1), (103, 53, 1))
    assert holes == [Hole(at=2, first=102, before=103)]
