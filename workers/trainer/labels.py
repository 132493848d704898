"""Labels: the forward return over ``h`` bars net of the spread, as classes.

For candle ``i`` the trade is entered at its close and left at the close of candle
``i + h``; the spread of candle ``i`` (``spread_mean``, in price units) is paid once. Its net
return is ``(close[i + h] - close[i] - spread[i]) / close[i]`` for a long position and
``(close[i] - close[i + h] - spread[i]) / close[i]`` for a short one. The class is UP when
the long side earns after the spread, DOWN when the short side does, FLAT otherwise. The
last ``h`` candles have no future to look at: their labels are missing (``NaN``) and the
dataset drops them.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from workers.features.base import Array

DOWN: Final = -1
FLAT: Final = 0
UP: Final = 1


def long_net_return(close: Array, spread: Array, horizon: int) -> Array:
    """The net return of a long trade from each candle over ``horizon`` bars; NaN at the end."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 bar, not {horizon}")
    out = np.full(len(close), np.nan)
    if len(close) > horizon:
        out[:-horizon] = (close[horizon:] - close[:-horizon] - spread[:-horizon]) / close[:-horizon]
    return out


def short_net_return(close: Array, spread: Array, horizon: int) -> Array:
    """The net return of a short trade from each candle over ``horizon`` bars; NaN at the end."""
    gross = long_net_return(close, np.zeros_like(spread), horizon)
    return -gross - spread / close


def classes(close: Array, spread: Array, horizon: int) -> Array:
    """DOWN / FLAT / UP per candle (as floats), NaN for the last ``horizon`` candles."""
    up = long_net_return(close, spread, horizon)
    down = short_net_return(close, spread, horizon)
    out = np.where(up > 0, UP, np.where(down > 0, DOWN, FLAT)).astype(np.float64)
    out[np.isnan(up)] = np.nan
    return out
