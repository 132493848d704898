"""candle-ingest as its own process for the fault tests: started, scraped, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import urllib.request
from collections.abc import Awaitable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from infra.stack import QuestDBUrls, StackUrls, free_ports
from tests.processes import spawn, worker_env


@dataclasses.dataclass
class IngestProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    log: Path

    async def metric(self, name: str) -> float:
        """The sum of a counter or gauge's samples named ``name`` on /metrics (0 if none)."""
        text = await asyncio.to_thread(self._scrape)
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name
        )

    def _scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def ready(self) -> bool:
        """Connected and consuming (``tickwire_up``); fails at once if the process died."""
        assert self.alive(), self.log.read_text()[-3000:]
        with contextlib.suppress(OSError):
            return await self.metric("tickwire_up") == 1
        return False

    async def alive_and(self, condition: Awaitable[bool]) -> bool:
        """``condition``, awaited, while the process runs; fails at once if it died."""
        assert self.alive(), self.log.read_text()[-3000:]
        return await condition

    def lines(self, *needles: str) -> list[str]:
        """Lines of its log that contain every needle."""
        return [
            line
            for line in self.log.read_text(errors="replace").splitlines()
            if all(n in line for n in needles)
        ]

    def stop(self) -> int:
        """SIGTERM, as a deployment stops it; its exit code."""
        if self.alive():
            self.proc.terminate()
        return self.proc.wait(timeout=60)


def start_ingest(
    nats_url: str, questdb: QuestDBUrls, namespace: str, log: Path, **settings: str
) -> IngestProcess:
    """candle-ingest on ``nats_url`` and ``questdb`` in ``namespace``, idle close off."""
    urls = StackUrls(nats_url, None, None, None, None, None)
    (port,) = free_ports(1)
    env = worker_env(
        urls,
        namespace,
        questdb_ilp=questdb.ilp_conf,
        questdb_http=questdb.http,
        idle_close="false",
        metrics_port=str(port),
        **settings,
    )
    return IngestProcess(spawn("candle-ingest", env, log), port, log)
