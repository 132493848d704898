"""``tickwire models list | show | promote | rollback``: the registry from a terminal.

A bad argument, an unknown version, a corrupt model or nothing to roll back to gives one
line on stderr and exit code 2, and the registry is left as it was. A candidate the gate
refuses stays a candidate: the reason is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import msgspec

from contracts.models import ModelCard
from workers.registry.store import Promotion, Registry, RegistryError

T = TypeVar("T")
log = logging.getLogger(__name__)

TIMEOUT_S: Final = 30.0
COLUMNS: Final = ("version", "feed", "symbol", "tf", "status", "feature_set_id", "auc", "trained")


def _fail(message: str) -> int:
    sys.stderr.write(f"tickwire models: {message}\n")
    return 2


def _with_registry(create: bool, action: Callable[[Registry], Awaitable[T]]) -> T:
    from workers.runtime.connection import connect_once
    from workers.runtime.settings import RuntimeSettings, load

    settings = load(RuntimeSettings)

    async def go() -> T:
        try:
            nc = await connect_once(settings, "tickwire-models")
        except (TimeoutError, OSError) as exc:
            raise RegistryError(
                f"NATS at {settings.nats_url} did not answer: {exc or 'timed out'}"
            ) from None
        try:
            registry = await Registry.open(
                nc.jetstream(), namespace=settings.namespace, create=create
            )
            return await action(registry)
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(go(), TIMEOUT_S))
    except TimeoutError:
        raise RegistryError(
            f"NATS at {settings.nats_url} did not answer in {TIMEOUT_S:g}s"
        ) from None


async def _promote(registry: Registry, args: argparse.Namespace) -> Promotion:
    """Gate ``args.version`` and make it active if it passes; the decision either way."""
    promotion = await registry.prepare_promotion(
        args.version, force=args.force, metric=args.metric, min_gain=args.min_gain
    )
    if promotion.promote:
        await registry.commit(promotion)
    return promotion


def table(cards: list[ModelCard]) -> str:
    rows = [COLUMNS]
    for c in cards:
        auc = c.metrics.get("auc")
        rows.append(
            (
                c.version,
                c.feed,
                c.symbol,
                c.tf.value,
                c.status.value,
                c.feature_set_id,
                "-" if auc is None else f"{auc:.4f}",
                f"{c.train_from_ms}..{c.train_to_ms}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def run(args: argparse.Namespace) -> int:
    """Run one ``tickwire models`` action; RegistryError becomes one line and exit 2."""
    try:
        if args.action == "list":
            cards = _with_registry(
                False, lambda r: r.list(feed=args.feed, symbol=args.symbol, tf=args.tf)
            )
            print(table(cards))
            return 0
        if args.action == "show":
            card = _with_registry(False, lambda r: r.card(args.version))
            print(msgspec.json.format(msgspec.json.encode(card), indent=2).decode())
            return 0
        if args.action == "promote":
            promotion = _with_registry(False, lambda r: _promote(r, args))
            if promotion.already_active:
                print(f"{args.version} is already active: nothing changed")
                return 0
            if not promotion.promote:
                print(f"not promoted, {args.version} stays a candidate: {promotion.reason}")
                log.info("model %s not promoted: %s", args.version, promotion.reason)
                return 1
            print(f"promoted {args.version}: {promotion.reason}")
            return 0
        pointer = _with_registry(False, lambda r: r.rollback(args.feed, args.symbol, args.tf))
        print(f"rolled back {args.feed} {args.symbol} {args.tf}: active is {pointer.version}")
        return 0
    except RegistryError as exc:
        return _fail(str(exc))
