"""Realistic candle series for feature tests: a random walk with changing volatility, quiet
stretches, session gaps, prices rounded to the symbol's digits, and flat candles."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import numpy as np
from nats.js import JetStreamContext
from tqdm import tqdm

from contracts import subjects
from contracts.codec import encode
from contracts.messages import Candle, Timeframe
from workers.ea_sim.market import SYMBOLS as SIM_SYMBOLS
from workers.runtime.publish import MSG_ID

START_MS = 1_735_000_200_000  # 2024-12-24 00:30 UTC, a Tuesday


def series(
    n: int,
    *,
    seed: int = 1,
    price: float = 1.1,
    digits: int = 5,
    feed: str = "feed-a",
    symbol: str = "EURUSD",
    tf: Timeframe = Timeframe.M1,
    start_ms: int = START_MS,
) -> list[Candle]:
    rng = np.random.default_rng(seed)
    step = tf.ms
    # volatility regime that drifts slowly, with bursts
    vol = 3e-4 * np.exp(np.cumsum(rng.normal(0, 0.05, n)).clip(-2, 2))
    vol *= np.where(rng.random(n) < 0.01, 4.0, 1.0)
    # four sub-steps per candle give open, high, low, close
    moves = rng.normal(0, 1, (n, 4)) * vol[:, None] / 2
    log_path = np.log(price) + np.cumsum(moves.ravel()).reshape(n, 4)
    path = np.round(np.exp(log_path), digits)
    prev_close = np.concatenate([[round(price, digits)], path[:-1, 3]])
    o = prev_close
    c = path[:, 3]
    h = np.maximum(np.maximum(o, c), path.max(axis=1))
    lo = np.minimum(np.minimum(o, c), path.min(axis=1))
    flat = rng.random(n) < 0.02  # an illiquid minute: one tick
    h = np.where(flat, o, h)
    lo = np.where(flat, o, lo)
    c = np.where(flat, o, c)
    volume = np.where(flat, 1, rng.poisson(40 * vol / 3e-4) + 1)
    spread = np.round(price * rng.uniform(1e-5, 6e-5, n), digits + 1)
    # gaps: now and then the market is closed for a while
    gaps = np.where(rng.random(n) < 0.002, rng.integers(10, 3000, n), 0)
    opens = start_ms + step * (np.arange(n) + np.cumsum(gaps))
    out = []
    for i in range(n):
        t = int(opens[i])
        out.append(
            Candle(
                feed=feed,
                symbol=symbol,
                tf=tf,
                open_time_ms=t,
                close_time_ms=t + step,
                open=float(o[i]),
                high=float(h[i]),
                low=float(lo[i]),
                close=float(c[i]),
                tick_volume=int(volume[i]),
                spread_mean=float(spread[i]),
                spread_max=float(spread[i]) * 2,
                first_tick_ms=t,
                last_tick_ms=t + step - 1,
            )
        )
    return out


def history_before(start_ms: int, pairs: Iterable[tuple[str, str]], n: int) -> list[Candle]:
    """``n`` candles per feed/symbol and timeframe at the simulator's prices, the last one
    closing where the first candle of that timeframe at ``start_ms`` opens."""
    out = []
    for k, (feed, symbol) in enumerate(pairs):
        spec = SIM_SYMBOLS[symbol]
        for i, tf in enumerate(Timeframe):
            first = start_ms - start_ms % tf.ms  # day start 00:00 UTC
            made = series(
                n,
                seed=k * 10 + i,
                price=spec.price,
                digits=spec.digits,
                feed=feed,
                symbol=symbol,
                tf=tf,
                start_ms=first - n * tf.ms,
            )
            out += [c for c in made if c.close_time_ms <= first]
    return out


async def publish(
    js: JetStreamContext, candles: list[Candle], *, namespace: str, progress: bool = False
) -> None:
    """Onto CANDLES with candle-ingest's message ids, acks awaited."""
    pending = []
    for c in tqdm(
        candles, desc="history candles", unit="candle", leave=False, disable=not progress
    ):
        subject = subjects.candles(c.feed, c.symbol, c.tf, namespace=namespace)
        key = f"{c.feed}|{c.symbol}|{c.tf.value}|{c.open_time_ms}|{c.revision}"
        pending.append(await js.publish_async(subject, encode(c), headers={MSG_ID: key}))
        if len(pending) >= 1000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
