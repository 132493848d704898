"""The tickwire console script: one line and exit code 2 for any bad argument."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def tickwire(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", "TICKWIRE_POSTGRES_DSN": ""},
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((), "required: command"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("run",), "required: worker"),
        (("run", "candle-eater"), "invalid choice: 'candle-eater'"),
        (("streams", "ensure", "--replicas", "2"), "invalid choice: 2"),
        (("db", "drop"), "invalid choice: 'drop'"),
        (("db", "migrate"), "no PostgreSQL DSN"),
        (("nats-permissions", "scheduler", "--partitions", "2"), "does not run as partitions"),
        (("nats-permissions", "model-scorer", "--partitions", "1"), "from 2 to 64, not '1'"),
        (("nats-permissions", "model-scorer"), "required: --partitions"),
        (("nats-permissions", "model-scorer", "--partitions", "2", "--accounts", "/no/such"),
         "cannot read /no/such"),
        (("streams", "ensure", "--partitions", "candle-ingest"), "from 1 to 64"),
        (("streams", "ensure", "--partitions", "candle-ingest=0"), "from 1 to 64"),
        (("streams", "ensure", "--partitions", "scorer=2"), "expected WORKER=N"),
        (("up", "--workers", "scheduler", "--timeout", "nan"), "finite number > 0: 'nan'"),
        (("up", "--workers", "scheduler", "--timeout", "0"), "finite number > 0: '0'"),
    ],
)  # fmt: skip
def test_bad_arguments_give_one_line_and_exit_2(args: tuple[str, ...], says: str) -> None:
    proc = tickwire(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert says in lines[0]
    assert lines[0].startswith("tickwire")


def test_help_lists_every_subcommand() -> None:
    proc = tickwire("--help")
    assert proc.returncode == 0
    for command in ("run", "stack", "db", "contracts", "streams", "demo"):
        assert command in proc.stdout


def test_delegated_subcommands_receive_their_options(tmp_path) -> None:
    out = tmp_path / "api.json"
    proc = tickwire("contracts", "asyncapi", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("{")
    bad = tickwire("stack", "--no-such-option")
    assert bad.returncode == 2
    assert "--no-such-option" in bad.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("streams", "ensure"), 2),
        (("subscribers", "list"), 2),
        (("models", "list"), 2),
        (("dlq", "list"), 2),
        (("rebuild", "--from", "2025-03-03", "--stages", "scores"), 1),
        (("import", "mt5-ticks", "{ticks}", "--feed", "f", "--symbol", "EURUSD"), 1),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, tuple) else str(a),
)
def test_a_command_gives_up_on_nats_out_of_reach_with_one_line(
    args: tuple[str, ...], code: int, tmp_path: Path
) -> None:
    """A command is not a worker: it does not retry for ever on a wrong URL or a server
    down, it says so in one line."""
    ticks = tmp_path / "ticks.csv"
    ticks.write_text("<DATE>\t<TIME>\t<BID>\t<ASK>\n2025.03.03\t10:00:00.000\t1.1\t1.2\n")
    args = tuple(str(ticks) if a == "{ticks}" else a for a in args)
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "",
            "TICKWIRE_NATS_URL": url,
            "TICKWIRE_NATS_CONNECT_TIMEOUT_S": "0.5",
            "TICKWIRE_LOG_LEVEL": "ERROR",
        },
    )
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"NATS at {url} did not answer" in lines[0]
