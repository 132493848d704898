"""``make bench``: every benchmark on a private local stack, one table, bench/results.json."""

from __future__ import annotations

import argparse
import asyncio
import logging

from bench import (
    candle_ingest,
    e2e,
    feature_builder,
    model_scorer,
    runtime,
    timescale_replicator,
)
from bench.report import RESULTS, Figure, save, table
from infra.stack import LocalStack
from workers.runtime.worker import tune_interpreter


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=[
            "runtime",
            "candle-ingest",
            "feature-builder",
            "model-scorer",
            "timescale-replicator",
            "e2e",
        ],
        help="one benchmark",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # workers timed in this process run on the interpreter settings of a worker process;
    # the baselines run on the same
    tune_interpreter()
    with LocalStack(postgres=args.only in (None, "timescale-replicator", "e2e")) as stack:
        urls = stack.urls
        assert urls.nats_url is not None
        figures: list[Figure] = []
        if args.only in (None, "runtime"):
            figures += asyncio.run(
                runtime.measure(urls.nats_url, n=args.messages, repeats=args.repeats)
            )
        if args.only in (None, "candle-ingest"):
            figures += candle_ingest.measure(urls)
        if args.only in (None, "feature-builder"):
            figures += feature_builder.measure(urls)
        if args.only in (None, "model-scorer"):
            figures += model_scorer.measure(urls)
        if args.only in (None, "timescale-replicator"):
            figures += timescale_replicator.measure(stack)
        if args.only in (None, "e2e"):
            figures += e2e.measure(stack)
    print()
    print(table(figures))
    save(figures)
    print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
