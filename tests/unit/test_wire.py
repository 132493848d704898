"""Frames queued in one write are byte for byte what nats-py's own publish builds, and what
may not go into a frame is refused."""

from __future__ import annotations

import pytest
from nats.errors import BadHeaderError, BadSubjectError, MaxPayloadError
from nats.protocol.command import hpub_cmd

from workers.runtime import wire


def test_acks_are_nats_py_pub_frames() -> None:
    replies = [
        f"$JS.ACK.CANDLES.feature-builder.1.{n}.{n}.1763830000000000000.{9 - n}" for n in range(3)
    ]
    for body in (b"+ACK", b"-NAK", b'-NAK {"delay":2000000000}'):
        # the protocol's "PUB <subject> <#bytes>\r\n<payload>\r\n", no reply subject
        expected = b"".join(b"PUB %s %d\r\n%s\r\n" % (r.encode(), len(body), body) for r in replies)
        assert wire.acks(replies, body) == expected
    assert wire.acks([], b"+ACK") == b""


def test_publish_frames_are_nats_py_hpub_frames() -> None:
    subjects = ["features.icm.EURUSD.M1", "features.icm.US500=2Ecash.H4"]
    replies = ["_INBOX.abc.1", "_INBOX.abc.2"]
    ids = ["icm|EURUSD|M1|1741038600000|0|f1", "icm|US500.cash|H4|1741038600000|2|f1"]
    payloads = [b'{"a":1}', '{"s":"Ü"}'.encode()]
    # nats-py's publish(headers=...) writes the header block this way
    blocks = [f"NATS/1.0\r\nNats-Msg-Id: {i}\r\n\r\n".encode() for i in ids]
    assert wire.id_header_blocks(ids) == blocks
    assert wire.header_block({"Nats-Msg-Id": ids[0]}) == blocks[0]
    assert wire.header_block({"Nats-Msg-Id": "x", "X-Trace": " t1 "}) == (
        b"NATS/1.0\r\nNats-Msg-Id: x\r\nX-Trace: t1\r\n\r\n"
    )

    frames = wire.hpub_frames(1024, subjects, replies, blocks, payloads)
    expected = b"".join(
        hpub_cmd(s, r, h, p) for s, r, h, p in zip(subjects, replies, blocks, payloads, strict=True)
    )
    assert b"".join(frames) == expected


@pytest.mark.parametrize("subject", ["", "a b", "a\r\nPUB x 0", "a\tb"])
def test_a_subject_that_would_break_the_frame_is_refused(subject: str) -> None:
    with pytest.raises(BadSubjectError):
        wire.hpub_frames(1024, ["ok.subject", subject], ["r.1", "r.2"], [b"", b""], [b"", b""])
    with pytest.raises(BadSubjectError):
        wire.hpub_frames(1024, ["ok.subject"], [subject], [b""], [b""])


def test_a_header_that_would_break_the_frame_is_refused() -> None:
    with pytest.raises(BadHeaderError):
        wire.id_header_blocks(["fine", "two\r\nX-Injected: 1"])
    with pytest.raises(BadHeaderError):
        wire.header_block({"Bad Key": "v"})
    with pytest.raises(BadHeaderError):
        wire.header_block({"X-Value": "a\nb"})


def test_a_payload_over_the_servers_limit_is_refused() -> None:
    assert wire.hpub_frames(4, ["s"], ["r"], [b""], [b"1234"])
    with pytest.raises(MaxPayloadError):
        wire.hpub_frames(4, ["s", "s"], ["r", "r"], [b"", b""], [b"1234", b"12345"])
