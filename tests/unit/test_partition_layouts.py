"""Where a worker's durable starts when its layout changes, and when one is stale.

A layout is the set of a worker's durables for one partition count: ``candle-ingest``
alone, or ``candle-ingest-0of2`` and ``candle-ingest-1of2``. Floors are ack floors.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from nats.js.api import ConsumerConfig, ConsumerInfo

from workers.runtime.partition import behind, consuming, layout_of, start_of

W = "candle-ingest"


@pytest.mark.parametrize(
    ("durable", "layout"),
    [
        ("candle-ingest", 1),
        ("candle-ingest-0of2", 2),
        ("candle-ingest-11of12", 12),
        ("candle-ingest-replay", None),
        ("candle-ingest-0of2-readback", None),
        ("timescale-replicator", None),
        ("candle-ingestx", None),
    ],
)
def test_layout_of(durable: str, layout: int | None) -> None:
    assert layout_of(durable, W) == layout


@pytest.mark.parametrize(
    ("durable", "floors", "start"),
    [
        # a fresh deployment: as the spec says
        (W, {}, None),
        ("candle-ingest-0of2", {"timescale-replicator": 500}, None),
        # one to two: after the single one
        ("candle-ingest-0of2", {W: 700}, 701),
        ("candle-ingest-1of2", {W: 700, "candle-ingest-0of2": 700}, 701),
        # two back to one: after the lower partition, the one that has not done more
        (W, {"candle-ingest-0of2": 910, "candle-ingest-1of2": 905}, 906),
        # two to three, the single one still there from before: after the two
        ("candle-ingest-0of3", {W: 700, "candle-ingest-0of2": 910, "candle-ingest-1of2": 905}, 906),
        # one partition remade: after its sibling, not after the stale single one
        ("candle-ingest-0of2", {W: 700, "candle-ingest-1of2": 905}, 906),
    ],
)  # fmt: skip
def test_a_durable_made_now_starts_after_the_layout_that_got_furthest(
    durable: str, floors: dict[str, int], start: int | None
) -> None:
    assert start_of(durable, W, floors) == start


def test_a_durable_passed_by_another_layout_is_stale() -> None:
    floors = {W: 700, "candle-ingest-0of2": 910, "candle-ingest-1of2": 905, "other": 1}
    assert behind(W, floors) == ["candle-ingest-0of2", "candle-ingest-1of2"]
    # partitions of one layout never make each other stale, nor does a layout behind
    assert behind("candle-ingest-1of2", floors) == []
    assert behind("candle-ingest-0of2", floors) == []
    # a new layout that starts where the last one stopped is not stale, the old one is
    floors |= {"candle-ingest-0of3": 905, "candle-ingest-1of3": 905, "candle-ingest-2of3": 905}
    assert behind("candle-ingest-2of3", floors) == []
    floors |= {"candle-ingest-0of3": 990, "candle-ingest-1of3": 950, "candle-ingest-2of3": 960}
    assert behind("candle-ingest-0of2", floors) == [f"candle-ingest-{k}of3" for k in range(3)]
    assert behind("other", floors) == []


def test_a_layout_with_pull_requests_waiting_is_running() -> None:
    def info(name: str, waiting: int) -> ConsumerInfo:
        created = datetime(2026, 1, 5, tzinfo=UTC)
        return ConsumerInfo(name, "TICKS", ConsumerConfig(), created, num_waiting=waiting)

    infos = [
        info(W, 1),
        info("candle-ingest-0of2", 0),
        info("candle-ingest-1of2", 2),
        info("candle-ingest-replay", 1),  # a short-lived reader, not a layout
        info("feature-builder", 1),  # another worker
    ]
    assert consuming(infos, W, 1) == ["candle-ingest-1of2"]
    assert consuming(infos, W, 2) == [W]
    assert consuming(infos, W, 3) == [W, "candle-ingest-1of2"]
    # its own layout's partitions run beside each other, as they should
    assert consuming([info("candle-ingest-1of2", 3)], W, 2) == []
