"""Worker settings: read from TICKWIRE_* variables, frozen, secrets hidden, bad input = one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from workers.runtime.settings import RuntimeSettings, load


def test_reads_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKWIRE_NATS_URL", "nats://a:4222,nats://b:4222")
    monkeypatch.setenv("TICKWIRE_FETCH_BATCH", "250")
    s = load(RuntimeSettings)
    assert s.nats_url == "nats://a:4222,nats://b:4222"
    assert s.fetch_batch == 250


def test_secrets_never_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TICKWIRE_NATS_PASSWORD", "hunter2-secret")
    s = load(RuntimeSettings)
    assert "hunter2-secret" not in repr(s)
    assert "hunter2-secret" not in str(s)
    assert "hunter2-secret" not in str(s.model_dump())
    assert s.nats_password is not None
    assert s.nats_password.get_secret_value() == "hunter2-secret"


def test_settings_are_frozen() -> None:
    s = RuntimeSettings()
    with pytest.raises(ValidationError):
        s.fetch_batch = 5  # type: ignore[misc]


def loading_fails(code: str, env: dict[str, str]) -> str:
    """What a process that runs ``code`` (loading settings) with ``env`` says as it stops
    with exit code 2: one line."""
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PATH": ""}, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_bad_variable_stops_the_process_with_one_line() -> None:
    line = loading_fails(
        "from workers.runtime.settings import *; load(RuntimeSettings)",
        {"TICKWIRE_FETCH_BATCH": "lots"},
    )
    assert line.startswith("tickwire: bad setting TICKWIRE_FETCH_BATCH:")


def test_candle_ingest_symbols_are_symbols_or_feed_slash_symbol() -> None:
    from workers.candle_ingest.app import Settings

    allowed = Settings(symbols=" EURUSD, icm/US500.cash ,").allowed_symbols()
    assert allowed == {"EURUSD", "icm/US500.cash"}
    assert Settings().allowed_symbols() is None
    for bad in ("a.b/EURUSD", "EUR\x00USD", "X" * 65):
        with pytest.raises(ValidationError):
            Settings(symbols=bad)


def test_candle_ingest_closes_idle_symbols_by_the_clock_live_not_in_a_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from workers.candle_ingest.app import Settings

    assert Settings().idle_close is True
    assert Settings(namespace="r1").idle_close is False
    assert Settings(namespace="r1", idle_close=True).idle_close is True
    monkeypatch.setenv("TICKWIRE_IDLE_CLOSE", "true")
    assert Settings(namespace="r1").idle_close is True


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"TICKWIRE_SERVER_TZ": "America/New_York+7", "TICKWIRE_DAY_START_MINUTES": "1320"},
            "tickwire: bad settings: Value error, set TICKWIRE_SERVER_TZ or "
            "TICKWIRE_DAY_START_MINUTES, not both",
        ),
        (
            {"TICKWIRE_SERVER_TZ": "Asia/Kolkata"},
            "tickwire: bad setting TICKWIRE_SERVER_TZ: Value error, Asia/Kolkata: the server "
            "clock's offsets must be whole hours",
        ),
        (
            {"TICKWIRE_SERVER_TZ": "Mars/Olympus"},
            "tickwire: bad setting TICKWIRE_SERVER_TZ: Value error, not a time zone: "
            "'Mars/Olympus'",
        ),
    ],
)
def test_candle_ingest_takes_a_day_start_or_a_server_time_zone(
    env: dict[str, str], says: str
) -> None:
    line = loading_fails("from workers.candle_ingest.app import *; load(Settings)", env)
    assert line.startswith(says)


def test_a_server_time_zone_reaches_candle_ingest_aggregator() -> None:
    from workers.candle_ingest.app import Settings

    config = Settings(server_tz="Europe/Athens").aggregator_config()
    assert (config.server_tz, config.day_start_ms) == ("Europe/Athens", 0)
    assert Settings(server_tz=" ").aggregator_config().server_tz is None  # empty: unset
