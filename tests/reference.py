"""Candles computed the plain way, with pandas, to check the streaming aggregation against.

Sort the accepted ticks by time (ties keep arrival order), bucket each timeframe by flooring
the time (shifted by the day start), and take first/max/min/last of the bid per bucket.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

TIMEFRAMES = {
    "M1": 60_000,
    "M5": 300_000,
    "M15": 900_000,
    "M30": 1_800_000,
    "H1": 3_600_000,
    "H4": 14_400_000,
    "D1": 86_400_000,
}


def candles(ticks: list[dict[str, Any]], *, day_start_ms: int = 0) -> dict[tuple, dict[str, Any]]:
    """{(feed, symbol, tf, open_time_ms): candle fields} from accepted ticks in arrival order."""
    df = pd.DataFrame(ticks)
    df["arrival"] = range(len(df))
    df = df.sort_values(["time_ms", "arrival"], kind="stable")
    df["spread"] = df["ask"] - df["bid"]
    # None where a tick has no real volume: a column of objects until made numeric
    df["volume"] = df["volume"].astype("float64").fillna(0.0) if "volume" in df else 0.0
    out: dict[tuple, dict[str, Any]] = {}
    for tf, length in TIMEFRAMES.items():
        df["open_time_ms"] = (df["time_ms"] - day_start_ms) // length * length + day_start_ms
        grouped = df.groupby(["feed", "symbol", "open_time_ms"], sort=True).agg(
            open=("bid", "first"),
            high=("bid", "max"),
            low=("bid", "min"),
            close=("bid", "last"),
            tick_volume=("bid", "size"),
            real_volume=("volume", "sum"),
            spread_mean=("spread", "mean"),
            spread_max=("spread", "max"),
            first_tick_ms=("time_ms", "min"),
            last_tick_ms=("time_ms", "max"),
        )
        for (feed, symbol, open_ms), row in grouped.iterrows():
            out[feed, symbol, tf, int(open_ms)] = {
                "close_time_ms": int(open_ms) + length,
                "open": float(row["open"]),
                "high": float(row["high"]),
                "low": float(row["low"]),
                "close": float(row["close"]),
                "tick_volume": int(row["tick_volume"]),
                "real_volume": float(row["real_volume"]),
                "spread_mean": float(row["spread_mean"]),
                "spread_max": float(row["spread_max"]),
                "first_tick_ms": int(row["first_tick_ms"]),
                "last_tick_ms": int(row["last_tick_ms"]),
            }
    return out


EXACT = (
    "close_time_ms",
    "open",
    "high",
    "low",
    "close",
    "tick_volume",
    "spread_max",
    "first_tick_ms",
    "last_tick_ms",
)


def differences(
    got: dict[tuple, dict[str, Any]], want: dict[tuple, dict[str, Any]], limit: int = 10
) -> list[str]:
    """Human-readable differences; sums and means compared to 1e-9 relative."""
    diffs = []
    for key in sorted(set(got) | set(want)):
        if key not in got:
            diffs.append(f"missing {key}")
        elif key not in want:
            diffs.append(f"unexpected {key}: {got[key]}")
        else:
            g, w = got[key], want[key]
            for name in EXACT:
                if g[name] != w[name]:
                    diffs.append(f"{key} {name}: got {g[name]!r} want {w[name]!r}")
            for name in ("real_volume", "spread_mean"):
                if abs(g[name] - w[name]) > 1e-9 * max(1.0, abs(w[name])):
                    diffs.append(f"{key} {name}: got {g[name]!r} want {w[name]!r}")
        if len(diffs) >= limit:
            break
    return diffs
