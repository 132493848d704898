"""A worker scaled out as partitions, one process each, draining a stream already filled.

Each partition is a real ``tickwire run <worker>`` process with ``TICKWIRE_PARTITIONS`` and
``TICKWIRE_PARTITION`` set, as ops would run them: one per core. Every partition's durable
sees the whole stream and acks the other partitions' messages unread, so the stream is
drained when the slowest durable has nothing left.

Process start-up (imports, connecting, ensuring streams, restoring state) is not the
worker's throughput, so the rate is taken in the steady middle of the drain: the messages
the slowest partition finished between 10 % and 90 % of the stream, over the time between.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

import nats

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.05


async def _remaining(js: nats.js.JetStreamContext, stream: str, durable: str) -> int | None:
    with contextlib.suppress(Exception):
        info = await js.consumer_info(stream, durable)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
    return None


async def drain_rate(
    nats_url: str,
    worker: str,
    env: dict[str, str],
    stream: str,
    messages: int,
    *,
    partitions: int = 2,
    timeout_s: float = 600.0,
) -> float:
    """Messages/s of ``partitions`` processes of ``worker`` draining ``messages`` messages."""
    base = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": nats_url,
        "TICKWIRE_LOG_LEVEL": "WARNING",
        "TICKWIRE_PARTITIONS": str(partitions),
        **env,
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workers.cli",
            "run",
            worker,
            env=base | {"TICKWIRE_PARTITION": str(k)},
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
        )
        for k in range(partitions)
    ]
    # one instance alone consumes on the worker's own durable (PartitionedSettings.durable)
    durables = (
        [worker] if partitions == 1 else [f"{worker}-{k}of{partitions}" for k in range(partitions)]
    )
    low, high = messages // 10, messages - messages // 10
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        start: tuple[float, int] | None = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            left = [await _remaining(js, stream, d) for d in durables]
            now = time.perf_counter()
            if None not in left:
                done = messages - max(n for n in left if n is not None)
                if start is None and done >= low:
                    start = (now, done)
                elif start is not None and done >= high:
                    return (done - start[1]) / (now - start[0])
            for p in procs:
                if p.returncode is not None:
                    raise RuntimeError(f"{worker} partition exited with {p.returncode}")
            await asyncio.sleep(POLL_S)  # sampling progress to time a run
        raise TimeoutError(f"{worker}: {partitions} partitions did not drain in {timeout_s} s")
    finally:
        await nc.close()
        for p in procs:
            if p.returncode is None:
                p.terminate()
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 60)
            except TimeoutError:
                p.kill()
                await p.wait()
