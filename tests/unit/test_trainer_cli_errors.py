"""``tickwire train`` when its surroundings fail: an unusable ``--out``, PostgreSQL or NATS not
answering. One line and exit code 2 (exit 1 means "not promoted"), never a traceback, never
a run that hangs; each is found before the training whose result it would lose."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.trainer_market import market
from workers.trainer import cli


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def args(out: Path) -> argparse.Namespace:
    return argparse.Namespace(
        feed="demo", symbol="EURUSD", tf="M5", start="2025-01-01", end="2025-02-01",
        horizon=3, folds=4, out=out, promote=False,
    )  # fmt: skip


def refused(capsys: pytest.CaptureFixture[str], out: Path) -> str:
    with pytest.raises(SystemExit) as stopped:
        cli.run(args(out))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tickwire: "), lines
    return lines[0]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def train(*a: Any, **k: Any) -> Any:
        raise AssertionError("trained although the run cannot end well")

    monkeypatch.setattr(cli, "train", train)


def test_an_out_that_is_a_file_is_refused_before_anything_is_read(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_training: None,
) -> None:
    monkeypatch.setenv("TICKWIRE_POSTGRES_DSN", f"postgresql://u:p@127.0.0.1:{closed_port()}/db")
    out = tmp_path / "report"
    out.write_text("a file, not a directory\n")
    assert refused(capsys, out).startswith(f"tickwire: --out {out}: ")


@pytest.mark.parametrize("dsn", ["postgresql://u:p@127.0.0.1:{port}/db", "not a dsn"])
def test_postgresql_down_or_a_malformed_dsn_is_one_line(
    dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_training: None,
) -> None:
    monkeypatch.setenv("TICKWIRE_POSTGRES_DSN", dsn.format(port=closed_port()))
    line = refused(capsys, tmp_path / "out")
    assert line.startswith("tickwire: PostgreSQL did not give the candles: ")
    assert ":p@" not in line  # no password


def test_nats_down_is_one_line_before_the_training(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_training: None,
) -> None:
    candles = market(3000, seed=1)

    async def load_candles(*a: Any, **k: Any) -> Any:
        return candles

    nowhere = f"nats://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("TICKWIRE_POSTGRES_DSN", "postgresql://u:p@127.0.0.1:1/db")
    monkeypatch.setenv("TICKWIRE_NATS_URL", nowhere)
    monkeypatch.setenv("TICKWIRE_NATS_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setattr(cli, "load_candles", load_candles)
    assert refused(capsys, tmp_path / "out").startswith(
        f"tickwire: NATS at {nowhere} did not answer"
    )
