"""A worker as its own OS process, as production runs it: for the kill -9 tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infra.stack import StackUrls

REPO = Path(__file__).resolve().parents[1]


def worker_env(stack: StackUrls, namespace: str, **settings: str) -> dict[str, str]:
    """The environment of a worker in ``namespace`` on the test stack's NATS: pulls that
    expire after 1 s, warnings only, and ``settings`` as ``TICKWIRE_<NAME>``."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(stack.nats_url),
        "TICKWIRE_NAMESPACE": namespace,
        "TICKWIRE_PULL_EXPIRES_S": "1",
        "TICKWIRE_LOG_LEVEL": "WARNING",
    } | {f"TICKWIRE_{name.upper()}": value for name, value in settings.items()}


def spawn(worker: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``tickwire run WORKER`` with ``env``, its output appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "run", worker],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
