"""A trivial job for scheduler tests: each call appends one line to a file, so a run done
twice, or not at all, shows there."""

from __future__ import annotations

import datetime as dt
import os
import time


def record(feed: str, symbol: str, tf: str, fire_time: dt.datetime) -> str:
    line = f"{feed}/{symbol}/{tf} {fire_time.timestamp():.0f} {os.getpid()}\n"
    fd = os.open(os.environ["SCHEDULER_TEST_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())  # one small O_APPEND write: lines never interleave
    finally:
        os.close(fd)
    return "recorded"


def record_slowly(feed: str, symbol: str, tf: str, fire_time: dt.datetime) -> str:
    """``record``, after ``SCHEDULER_TEST_JOB_S`` seconds of work: a job that outlasts the
    interval between its fire times."""
    time.sleep(float(os.environ["SCHEDULER_TEST_JOB_S"]))
    return record(feed, symbol, tf, fire_time)


def record_and_exit(feed: str, symbol: str, tf: str, fire_time: dt.datetime) -> str:
    """``record``, then ``sys.exit(3)``, as a command-line function used as a job may."""
    record(feed, symbol, tf, fire_time)
    raise SystemExit(3)
