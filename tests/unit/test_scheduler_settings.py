"""``tickwire run scheduler`` settings: the schedule is checked at start, one line if bad."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from workers.trainer.scheduler import (
    Entry,
    Settings,
    cron_trigger,
    max_instances,
    parse_entry,
    sync_jobs,
)


def test_entries_are_parsed_into_series_and_cron() -> None:
    settings = Settings(
        train_schedule="demo/EURUSD/M5@0 3 * * mon-fri; demo/US500.cash/H1 @ 30 */4 * * *"  # type: ignore[arg-type]
    )
    assert settings.train_schedule == (
        Entry("demo", "EURUSD", "M5", "0 3 * * mon-fri"),
        Entry("demo", "US500.cash", "H1", "30 */4 * * *"),
    )
    assert settings.train_schedule[1].job_id == "train:demo/US500.cash/H1"


def test_five_fields_are_crontab_and_six_fields_start_with_seconds() -> None:
    start = dt.datetime(2026, 3, 2, 2, 59, 59, tzinfo=dt.UTC)  # a Monday
    five = cron_trigger("0 3 * * mon-fri").get_next_fire_time(None, start)
    assert five == dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.UTC)
    six = cron_trigger("*/20 * * * * *").get_next_fire_time(None, start)
    assert six == dt.datetime(2026, 3, 2, 3, 0, 0, tzinfo=dt.UTC)
    saturday = dt.datetime(2026, 3, 7, 0, 0, tzinfo=dt.UTC)
    monday = cron_trigger("0 3 * * mon-fri").get_next_fire_time(None, saturday)
    assert monday == dt.datetime(2026, 3, 9, 3, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("demo/EURUSD@0 3 * * *", "is not feed/symbol/tf@cron"),
        ("demo/EURUSD/M5", "is not feed/symbol/tf@cron"),
        ("demo/EURUSD/M7@0 3 * * *", "M7"),
        ("demo/EURUSD/M5@0 3 * *", "has 4 fields"),
        ("demo/EURUSD/M5@0 25 * * *", "25"),
        ("de.mo/EURUSD/M5@0 3 * * *", "feed must match"),
        ("demo/EURUSD/M5@0 3 30 2 *", "never fires"),
        ("demo/EURUSD/M5@0 0 3 31 4 *", "never fires"),
        # read otherwise by crontab: 1-5 is Monday to Friday there, Tuesday to Saturday here
        ("demo/EURUSD/M5@0 3 * * 1-5", "with names (mon-fri)"),
        ("demo/EURUSD/M5@0 0 3 * * 0", "with names (mon-fri)"),
        ("demo/EURUSD/M5@0 3 1 * mon", "both the day of month and the day of week"),
    ],
)
def test_a_bad_entry_is_refused_with_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=r"\S") as info:
        parse_entry(text)
    assert says in str(info.value)


def run_scheduler(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "run", "scheduler"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", **env},
    )


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({}, "no PostgreSQL DSN"),
        ({"TICKWIRE_POSTGRES_DSN": "postgresql://x/y"}, "nothing to schedule"),
        (
            {"TICKWIRE_TRAIN_SCHEDULE": "demo/EURUSD/M5@0 3 * * *; demo/EURUSD/M5@0 4 * * *"},
            "bad setting TICKWIRE_TRAIN_SCHEDULE: Value error, scheduled twice: train:demo/EURUSD/M5",
        ),
        ({"TICKWIRE_TRAIN_SCHEDULE": "demo/EURUSD/M5@every day"}, "has 2 fields"),
        ({"TICKWIRE_TRAIN_SCHEDULE": "demo/EURUSD/M5@0 3 30 2 *"}, "never fires"),
        ({"TICKWIRE_TRAIN_WINDOW_DAYS": "0"}, "bad setting TICKWIRE_TRAIN_WINDOW_DAYS"),
        (
            {
                "TICKWIRE_POSTGRES_DSN": "postgresql://x/y",
                "TICKWIRE_TRAIN_SCHEDULE": "demo/EURUSD/M5@0 3 * * *",
                "TICKWIRE_SCHEDULER_JOB": "workers.trainer.scheduler:no_such_job",
            },
            "TICKWIRE_SCHEDULER_JOB",
        ),
    ],
)
def test_bad_settings_stop_the_scheduler_with_one_line(env: dict[str, str], says: str) -> None:
    proc = run_scheduler(env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr


async def test_a_stored_job_keeps_its_next_fire_time_when_only_how_its_runs_wait_changes() -> None:
    """A job stored by a scheduler that let one run of it at a time, now without coalescing:
    its runs wait their turn from now on, and the fire time it was due at is still due."""
    settings = Settings(
        train_schedule="demo/EURUSD/M5@0 3 * * *",  # type: ignore[arg-type]
        scheduler_coalesce=False,
        scheduler_job="tests.scheduler_job:record",
    )
    entry = settings.train_schedule[0]
    due = dt.datetime(2026, 1, 5, 3, 0, tzinfo=dt.UTC)  # missed while no scheduler ran
    scheduler = AsyncIOScheduler(timezone=dt.UTC)
    scheduler.start(paused=True)
    try:
        scheduler.add_job(
            settings.scheduler_job,
            entry.trigger(),
            id=entry.job_id,
            name=entry.job_id,
            kwargs={"feed": "demo", "symbol": "EURUSD", "tf": "M5", "fire_time": None},
            coalesce=False,
            misfire_grace_time=settings.scheduler_misfire_grace_s,
            max_instances=1,
            next_run_time=due,
        )
        sync_jobs(scheduler, settings)
        job = scheduler.get_job(entry.job_id)
        assert job.max_instances == max_instances(coalesce=False) > 1
        assert job.next_run_time == due
    finally:
        scheduler.shutdown(wait=False)


def test_a_report_directory_that_cannot_be_written_stops_the_scheduler_at_start(
    tmp_path: Path,
) -> None:
    """Every scheduled ``tickwire train`` writes its report there: one that cannot be
    written (a read-only container) is refused at start, not at each fire time."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = run_scheduler(
        {
            "TICKWIRE_POSTGRES_DSN": "postgresql://x/y",
            "TICKWIRE_TRAIN_SCHEDULE": "demo/EURUSD/M5@0 3 * * *",
            "TICKWIRE_TRAIN_OUT": str(not_a_dir / "reports"),
        }
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"TICKWIRE_TRAIN_OUT {not_a_dir / 'reports'}: " in proc.stderr


def test_a_postgresql_that_does_not_answer_stops_the_scheduler_with_one_line(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_scheduler(
        {
            "TICKWIRE_POSTGRES_DSN": f"postgresql://u:secret-pw@127.0.0.1:{port}/y",
            "TICKWIRE_TRAIN_SCHEDULE": "demo/EURUSD/M5@0 3 * * *",
            "TICKWIRE_TRAIN_OUT": str(tmp_path),
            "TICKWIRE_LOG_LEVEL": "WARNING",
        }
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot reach PostgreSQL" in proc.stderr
    assert "secret-pw" not in proc.stderr
