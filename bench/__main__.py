"""``make bench``: every benchmark on a private local stack, one table, bench/results.json."""

from __future__ import annotations

import argparse
import asyncio
import logging

from bench import runtime
from bench.report import RESULTS, Figure, save, table
from infra.stack import LocalStack


async def _all(nats_url: str, n: int, repeats: int) -> list[Figure]:
    return [*await runtime.measure(nats_url, n=n, repeats=repeats)]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with LocalStack(postgres=False, questdb=False) as stack:
        assert stack.urls.nats_url is not None
        figures = asyncio.run(_all(stack.urls.nats_url, args.messages, args.repeats))
    print()
    print(table(figures))
    save(figures)
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
