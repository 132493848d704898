"""A deterministic synthetic market of M5 candles for the trainer's tests.

With ``pattern`` the one-bar log return reverts what the last five bars did
(``r[t] = -0.3 * (r[t-5] + ... + r[t-1]) + noise``): a pattern the shared feature ``ret_5``
shows and a model can learn. Without it the returns are independent noise.
"""

from __future__ import annotations

import numpy as np

from workers.features import Candles

START_MS = 1_735_689_600_000  # 2025-01-01 00:00 UTC
M5_MS = 300_000


def market(n: int, *, seed: int = 1, pattern: bool = True) -> Candles:
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 1e-3, n)
    r = np.zeros(n)
    for t in range(n):
        past = r[max(0, t - 5) : t].sum()
        r[t] = (-0.3 * past if pattern else 0.0) + noise[t]
    close = 1.1 * np.exp(np.cumsum(r))
    open_ = np.concatenate([[1.1], close[:-1]])
    wiggle = np.abs(rng.normal(0.0, 3e-4, n)) * close
    return Candles(
        open_time_ms=START_MS + M5_MS * np.arange(n, dtype=np.int64),
        open=open_,
        high=np.maximum(open_, close) + wiggle,
        low=np.minimum(open_, close) - wiggle,
        close=close,
        tick_volume=rng.integers(20, 400, n).astype(np.int64),
        spread_mean=np.full(n, 2e-5),
    )
