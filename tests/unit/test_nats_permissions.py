"""``tickwire nats-permissions``: a partitioned worker's block of the deployed accounts file.

The block must still be a valid NATS configuration (checked by the real nats-server), allow
each partition's consumers on the worker's input stream, and leave every other subject as
it is. That the partitions then run under the printed block is shown on a real server in
``tests/integration/test_nats_users.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.streams import consumer_specs
from tests.unit.test_deployment_files import NATS_DIR, _nats_check, _nats_env
from workers.permissions import (
    ACCOUNTS,
    PARTITIONED,
    PermissionsError,
    block_name,
    partitioned_block,
    with_partitions,
)


def _subjects(block: str) -> list[str]:
    return re.findall(r'^\s*"([^"]+)"', block, re.M)


def _deployed_block(worker: str) -> str:
    match = re.search(rf"^{block_name(worker)}: \{{\n.*?^\}}$", ACCOUNTS.read_text(), re.M | re.S)
    assert match is not None
    return match.group(0)


def test_every_partitioned_worker_has_a_valid_configuration(tmp_path: Path) -> None:
    text = ACCOUNTS.read_text()
    for worker in PARTITIONED:
        text = with_partitions(text, worker, 3)
    (tmp_path / "accounts.conf").write_text(text)
    shutil.copy(NATS_DIR / "nats.conf", tmp_path / "nats.conf")
    done = _nats_check(tmp_path / "nats.conf", **_nats_env())
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stderr + done.stdout


@pytest.mark.parametrize("worker", PARTITIONED)
def test_each_partition_gets_the_subjects_of_the_worker_s_consumers(worker: str) -> None:
    stream = next(c.stream for c in consumer_specs() if c.durable == worker)
    before = _subjects(_deployed_block(worker))
    after = _subjects(partitioned_block(ACCOUNTS.read_text(), worker, 3))
    # the worker's own consumers on its input stream: the durable and those named after it
    own = re.compile(
        rf"^\$JS\.(API\.CONSUMER\.(MSG\.NEXT|[A-Z]+)|ACK)\.{stream}\.{worker}"
        rf"(-replay|-warmup|-readback)?(\.|$)"
    )
    named = [s for s in before if own.match(s)]
    assert named, f"{worker} names no consumer of {stream}"
    for k in range(3):
        durable = f"{worker}-{k}of3"
        assert [s for s in after if durable in s] == [
            s.replace(f".{stream}.{worker}", f".{stream}.{durable}", 1) for s in named
        ]
    # nothing else is added, and nothing removed or reordered
    assert [s for s in after if not re.search(rf"{worker}-\dof3", s)] == before


def test_the_next_block_is_untouched() -> None:
    text = ACCOUNTS.read_text()
    changed = with_partitions(text, "candle-ingest", 2)
    assert changed.count("candle-ingest-0of2") > 0
    assert _deployed_block("feature-builder") in changed
    assert "feature-builder-0of2" not in changed


@pytest.mark.parametrize(
    ("worker", "partitions", "says"),
    [
        ("timescale-replicator", 2, "does not run as partitions"),
        ("candle-ingest", 1, "2 or more"),
    ],
)
def test_refusals(worker: str, partitions: int, says: str) -> None:
    with pytest.raises(PermissionsError, match=says):
        partitioned_block(ACCOUNTS.read_text(), worker, partitions)


def test_an_accounts_file_without_the_block_is_refused() -> None:
    with pytest.raises(PermissionsError, match=re.escape("no line 'MODEL_SCORER_PERMISSIONS: {'")):
        partitioned_block("accounts: {}\n", "model-scorer", 2)


def _tickwire(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_the_command_prints_the_block() -> None:
    done = _tickwire("nats-permissions", "feature-builder", "--partitions", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == partitioned_block(ACCOUNTS.read_text(), "feature-builder", 2)
