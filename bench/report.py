"""One table for every benchmark: figure, baseline from the same run, ratio, target, verdict.

Absolute rates on a shared 2-core machine are noise; the ratio against a baseline measured
seconds earlier on the same machine is the figure that means something.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

RESULTS = Path(__file__).with_name("results.json")


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    baseline_name: str
    baseline: float
    target_ratio: float | None = None
    target_value: float | None = None
    lower_is_better: bool = False
    """The baseline is then a limit: met when the value stays at or below it."""
    limit: float | None = None
    """Met only when the value stays at or below it, whatever the baseline (a latency
    target beside a measured floor)."""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    @property
    def met(self) -> bool | None:
        if self.lower_is_better:
            return self.value <= self.baseline
        checks = []
        if self.target_ratio is not None:
            checks.append(self.ratio >= self.target_ratio)
        if self.target_value is not None:
            checks.append(self.value >= self.target_value)
        if self.limit is not None:
            checks.append(self.value <= self.limit)
        return all(checks) if checks else None

    def target(self) -> str:
        if self.lower_is_better:
            return f"<= {self.baseline:,.0f} {self.unit}"
        parts = []
        if self.target_ratio is not None:
            parts.append(f">= {self.target_ratio:g}x")
        if self.target_value is not None:
            parts.append(f">= {self.target_value:,.0f} {self.unit}")
        if self.limit is not None:
            parts.append(f"<= {self.limit:,.0f} {self.unit}")
        return " and ".join(parts) or "-"


async def counted(
    registry: CollectorRegistry, name: str, labels: dict[str, str], at_least: float
) -> float:
    """Seconds until the sample ``name{labels}`` of a worker in this process reaches
    ``at_least``. Only that metric is collected at each look (every 20 ms): collecting the
    whole registry would take worker time the bare consumer does not spend."""
    only = registry.restricted_registry([name])
    t0 = time.perf_counter()
    while True:
        for metric in only.collect():
            for sample in metric.samples:
                if sample.name == name and sample.labels == labels and sample.value >= at_least:
                    return time.perf_counter() - t0
        await asyncio.sleep(0.02)  # polling a counter to time a run, not synchronising a test


async def median_rate(n: int, run: Callable[[], Awaitable[float]], repeats: int) -> float:
    """Median messages/s over ``repeats`` runs of ``run`` (which returns elapsed seconds)."""
    return statistics.median([n / await run() for _ in range(repeats)])


async def best_in_turn(
    runs: list[str],
    worker: Callable[[str], Awaitable[float]],
    bare: Callable[[], Awaitable[float]],
    unit: str,
) -> tuple[float, float]:
    """The best rate of ``worker`` (one run on each of ``runs``) and of ``bare`` (as many
    runs), taking turns; every run is printed."""
    workers, bares = [], []
    for name in runs:
        bares.append(await bare())
        workers.append(await worker(name))
    w, b = (", ".join(f"{r:,.0f}" for r in rates) for rates in (workers, bares))
    print(f"  runs, in turn: worker {w}, bare {b} {unit}", flush=True)
    return max(workers), max(bares)


def table(figures: list[Figure]) -> str:
    head = ("figure", "value", "baseline (same run)", "ratio", "target", "")
    rows = [head]
    for f in figures:
        verdict = {True: "met", False: "SHORT", None: ""}[f.met]
        rows.append(
            (
                f.name,
                f"{f.value:,.0f} {f.unit}",
                f"{f.baseline_name}: {f.baseline:,.0f}",
                f"{f.ratio:.2f}x",
                f.target(),
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save(figures: list[Figure], path: Path = RESULTS) -> None:
    doc = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "figures": [asdict(f) | {"ratio": f.ratio, "met": f.met} for f in figures],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
