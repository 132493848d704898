"""The log of pull requests nobody answers: a line when it starts, one a minute while it
lasts, one when it ends, however often the requests are asked again."""

from __future__ import annotations

import logging

import pytest

from workers.runtime.pull import Unanswered

SUBJECT = "$JS.API.CONSUMER.MSG.NEXT.CANDLES.feature-builder"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "workers.runtime.pull"]


def test_an_outage_says_when_it_starts_every_minute_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers.runtime.pull")
    clock = Clock()
    log = Unanswered(SUBJECT, every_s=60.0, clock=clock)
    for _ in range(4 * 150):  # 150 s of requests ended four times a second
        log.ended()
        clock.now += 0.25
    log.answered()
    log.answered()  # answered again and again: nothing more to say
    said = lines(caplog)
    assert len(said) == 4, said
    assert said[0] == f"pull request ended: no responders on {SUBJECT}; asking again"
    assert said[1].startswith(f"pull requests on {SUBJECT} unanswered for 60 s (241 of them)")
    assert said[2].startswith(f"pull requests on {SUBJECT} unanswered for 120 s (481 of them)")
    assert said[3] == f"pull requests on {SUBJECT} answered again after 150.0 s and 600 unanswered"


def test_a_second_outage_is_told_from_its_own_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="workers.runtime.pull")
    clock = Clock()
    log = Unanswered(SUBJECT, every_s=60.0, clock=clock)
    log.ended()
    clock.now += 5
    log.answered()
    clock.now += 100
    log.ended()
    clock.now += 2
    log.ended()
    log.answered()
    said = lines(caplog)
    assert said == [
        f"pull request ended: no responders on {SUBJECT}; asking again",
        f"pull requests on {SUBJECT} answered again after 5.0 s and 1 unanswered",
        f"pull request ended: no responders on {SUBJECT}; asking again",
        f"pull requests on {SUBJECT} answered again after 2.0 s and 2 unanswered",
    ]
