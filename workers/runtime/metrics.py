"""Prometheus metrics and the /metrics + /healthz endpoint of one worker.

Each worker owns a registry (several workers may share a process in tests). The HTTP side is
a few lines on ``asyncio.start_server``: two fixed routes do not justify a web framework.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class WorkerMetrics:
    """The series every worker exposes; workers add their own on ``registry``."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_in = Counter(
            "tickwire_messages_in",
            "Input messages by outcome: ok, dead_letter, retry, other_partition, requeued_for_other",
            ["worker", "outcome"],
            registry=r,
        )
        self.messages_out = Counter(
            "tickwire_messages_out",
            "Messages published, by stream",
            ["worker", "stream"],
            registry=r,
        )
        self.dead_letters = Counter(
            "tickwire_dead_letters", "Dead letters by reason", ["worker", "reason"], registry=r
        )
        self.batch_size = Histogram(
            "tickwire_batch_size",
            "Messages per handled batch",
            ["worker"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.processing = Histogram(
            "tickwire_processing_seconds",
            "Time from batch taken to batch acked",
            ["worker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "tickwire_e2e_latency_seconds",
            "End-to-end latency from event time to output published, by stage",
            ["worker", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge(
            "tickwire_consumer_pending",
            "Messages in the stream not yet delivered to this consumer",
            ["worker", "stream", "consumer"],
            registry=r,
        )
        self.publish_failures = Counter(
            "tickwire_publish_failures",
            "Publish batches that failed or timed out (retried through redelivery)",
            ["worker"],
            registry=r,
        )
        self.transient_retries = Counter(
            "tickwire_transient_retries",
            "Batches held and retried because a dependency was unavailable",
            ["worker"],
            registry=r,
        )
        self.keepalives = Counter(
            "tickwire_keepalives",
            "Rounds of in-progress acks sent while held up (slow batch or dependency down)",
            ["worker"],
            registry=r,
        )
        self.read_back = Counter(
            "tickwire_read_back",
            "Messages read back from the stream because their delivery was lost on the way",
            ["worker"],
            registry=r,
        )
        self.up = Gauge("tickwire_up", "1 while connected and consuming", ["worker"], registry=r)
        # label children made once: hot paths call .inc() without a dict lookup per message
        self.in_ok = self.messages_in.labels(worker, "ok")
        self.in_dead = self.messages_in.labels(worker, "dead_letter")
        self.in_retry = self.messages_in.labels(worker, "retry")
        self.in_skipped = self.messages_in.labels(worker, "other_partition")
        self.in_not_ours = self.messages_in.labels(worker, "requeued_for_other")
        self.batch_size_w = self.batch_size.labels(worker)
        self.processing_w = self.processing.labels(worker)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves ``GET /metrics`` and ``GET /healthz`` (200 healthy, 503 not)."""

    def __init__(
        self, metrics: WorkerMetrics, healthy: Callable[[], bool], host: str, port: int
    ) -> None:
        self._metrics = metrics
        self._healthy = healthy
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, path, *_ = request.split(b" ", 2)
            path = path.split(b"?", 1)[0]
            if method != b"GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == b"/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self._metrics.exposition()
            elif path == b"/healthz":
                ok = self._healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", (b"ok\n" if ok else b"unhealthy\n")
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"/metrics or /healthz\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
