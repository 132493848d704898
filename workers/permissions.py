"""NATS permissions of a worker run as partitions, from the deployed accounts file.

A worker run as ``TICKWIRE_PARTITIONS=n`` consumes on ``<worker>-<k>of<n>`` and names its
short-lived consumers after that durable (``-replay``, ``-warmup``, ``-readback``). A
consumer name is one subject token, and a wildcard there would allow every consumer of the
stream (feature-builder could then ack timescale-replicator's candles away). So the
partitions' subjects are spelled out: ``tickwire nats-permissions WORKER --partitions N``
prints the worker's block of ``infra/nats/accounts.conf`` in which every subject naming one
of its consumers on its input stream is followed by the same subject for each partition's
consumer. The single consumer's subjects stay (they name only the worker's own consumers),
and so does a consumer the partitions share under one name (signal-publisher's on
ADVISORIES), which is not on the input stream.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from contracts.streams import consumer_specs
from workers.candle_ingest.app import REPLAY_SUFFIX
from workers.runtime.history import WARM_UP_SUFFIX
from workers.runtime.partition import PARTITIONED, durable_of
from workers.runtime.worker import READ_BACK_SUFFIX

ACCOUNTS: Final = Path(__file__).resolve().parents[1] / "infra" / "nats" / "accounts.conf"
SUFFIXES: Final = ("", REPLAY_SUFFIX, WARM_UP_SUFFIX, READ_BACK_SUFFIX)
"""A worker's consumers: its durable, and the short-lived ones named after it."""

_SUBJECT = re.compile(r'^(\s*)"([^"]+)"(.*)$')


class PermissionsError(Exception):
    """The accounts file has no block for the worker, or not one this reads."""


def block_name(worker: str) -> str:
    """``candle-ingest`` -> ``CANDLE_INGEST_PERMISSIONS``."""
    return worker.upper().replace("-", "_") + "_PERMISSIONS"


def _block(lines: list[str], worker: str) -> tuple[int, int]:
    """First and last line (inclusive) of the worker's permissions block."""
    head = f"{block_name(worker)}: {{"
    try:
        first = lines.index(head)
    except ValueError:
        raise PermissionsError(f"no line {head!r} in the accounts file") from None
    try:
        last = lines.index("}", first)
    except ValueError:
        raise PermissionsError(f"{block_name(worker)} has no closing '}}' line") from None
    return first, last


def _consumer_token(tokens: list[str]) -> int | None:
    """Where a consumer subject names its consumer (its stream is the token before):
    ``$JS.API.CONSUMER.<op>.<stream>.<name>``, ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>``
    and ``$JS.ACK.<stream>.<name>.>``; None for any other subject."""
    if tokens[:3] == ["$JS", "API", "CONSUMER"]:
        at = 6 if tokens[3:4] == ["MSG"] else 5
        return at if len(tokens) > at else None
    if tokens[:2] == ["$JS", "ACK"] and len(tokens) > 3:
        return 3
    return None


def _partition_subjects(subject: str, worker: str, stream: str, partitions: int) -> list[str]:
    """The subject for each partition's consumer, or [] when it names none of the worker's
    consumers on ``stream``, its input."""
    tokens = subject.split(".")
    at = _consumer_token(tokens)
    if at is None or tokens[at - 1] != stream:
        return []
    for suffix in SUFFIXES:
        if tokens[at] == worker + suffix:
            return [
                ".".join(
                    [*tokens[:at], durable_of(worker, k, partitions) + suffix, *tokens[at + 1 :]]
                )
                for k in range(partitions)
            ]
    return []


def input_stream(worker: str) -> str:
    """The stream the worker's durable consumes (live)."""
    return next(c.stream for c in consumer_specs() if c.durable == worker)


def partitioned_block(accounts: str, worker: str, partitions: int) -> str:
    """The worker's block of ``accounts``, allowing the consumers of ``partitions``."""
    if worker not in PARTITIONED:
        raise PermissionsError(f"{worker} does not run as partitions")
    if partitions < 2:
        raise PermissionsError(f"partitions must be 2 or more, not {partitions}")
    lines = accounts.splitlines()
    first, last = _block(lines, worker)
    out = [
        f"# {worker} as {partitions} partitions "
        f"(tickwire nats-permissions {worker} --partitions {partitions})",
    ]
    added, stream = 0, input_stream(worker)
    for line in lines[first : last + 1]:
        out.append(line)
        m = _SUBJECT.match(line)
        if m is None:
            continue
        indent, subject, rest = m.groups()
        for s in _partition_subjects(subject, worker, stream, partitions):
            out.append(f'{indent}"{s}"{rest}')
            added += 1
    if not added:
        raise PermissionsError(f"{block_name(worker)} names none of {worker}'s consumers")
    return "\n".join(out) + "\n"


def with_partitions(accounts: str, worker: str, partitions: int) -> str:
    """``accounts`` with the worker's block replaced by its partitioned one."""
    lines = accounts.splitlines()
    first, last = _block(lines, worker)
    block = partitioned_block(accounts, worker, partitions).splitlines()
    return "\n".join([*lines[:first], *block, *lines[last + 1 :]]) + "\n"
