"""``tickwire run scheduler``: retraining on a cron schedule, one active scheduler at a time.

``TICKWIRE_TRAIN_SCHEDULE`` lists ``feed/symbol/tf@cron`` entries; each becomes an
APScheduler job kept in PostgreSQL (``scheduler.apscheduler_jobs``), so a restarted or newly
elected scheduler carries on where the last one stopped: fire times missed while none was
running are run if still within the misfire grace (coalesced into one by default). A job
runs one fire time at a time: with coalescing, a fire time that comes while the job's last
run is still going is recorded as missed; without it (``TICKWIRE_SCHEDULER_COALESCE=false``),
every fire time runs, once, each after the one before.

Only the holder of a session-level advisory lock schedules anything; every other instance
waits and retries, and takes over when the holder's connection dies with it.

A fire time is claimed in ``scheduler.runs`` (unique per job and fire time) before the job
starts and before APScheduler moves the job's next fire time on, so a fire replayed after a
crash finds its claim and does not run twice. While the job runs its scheduler renews the
claim; a claimed run left unfinished and not renewed for ``TICKWIRE_SCHEDULER_RUN_LEASE_S``
(its scheduler died) is run again by the leader. A leader that loses its lock's connection
stops scheduling but finishes the job it is inside, renewing it, so the next leader does not
run the same fire time beside it. The job itself, by default, is one ``tickwire train`` of
the window ending at the scheduled fire time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import logging
import os
import secrets
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Final

import asyncpg
from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobExecutionEvent,
    JobSubmissionEvent,
)
from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.util import ref_to_obj
from prometheus_client import Counter, Gauge
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import SQLAlchemyError

from contracts.messages import Timeframe
from db.queries import query
from workers.cli import Refused, fail
from workers.runtime.metrics import MetricsServer, WorkerMetrics
from workers.runtime.settings import RuntimeSettings, load

log = logging.getLogger(__name__)

LOCK_NAME: Final = "tickwire:scheduler"
"""Advisory lock of the active scheduler: ``hashtext(LOCK_NAME)`` in its database."""
JOB_PREFIX: Final = "train:"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One line of the schedule: train ``feed/symbol/tf`` at every fire time of ``cron``."""

    feed: str
    symbol: str
    tf: str
    cron: str

    @property
    def job_id(self) -> str:
        return f"{JOB_PREFIX}{self.feed}/{self.symbol}/{self.tf}"

    def trigger(self) -> CronTrigger:
        return cron_trigger(self.cron)


def cron_trigger(cron: str) -> CronTrigger:
    """Five crontab fields (minute hour day month day-of-week), or six with seconds first;
    one that has no fire time from now on (such as 30 February) is refused, and so is one
    crontab would read otherwise: a numeric day of week, or both days set."""
    trigger = _cron_fields(cron)
    if trigger.get_next_fire_time(None, dt.datetime.now(dt.UTC)) is None:
        raise ValueError(f"cron {cron!r} never fires")
    return trigger


def _cron_fields(cron: str) -> CronTrigger:
    fields = cron.split()
    if len(fields) in (5, 6):
        # where crontab and APScheduler read the same text differently, refuse it
        day, dow = fields[-3], fields[-1]
        if any(ch.isdigit() for ch in dow):
            raise ValueError(
                f"cron {cron!r}: write the day of week with names (mon-fri): crontab counts "
                "0 = Sunday, this scheduler 0 = Monday"
            )
        if day != "*" and dow != "*":
            raise ValueError(
                f"cron {cron!r} sets both the day of month and the day of week: crontab runs "
                "when either matches, this scheduler only when both do; leave one of them *"
            )
    if len(fields) == 5:
        return CronTrigger.from_crontab(cron, timezone=dt.UTC)
    if len(fields) == 6:
        second, minute, hour, day, month, dow = fields
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=dow,
            timezone=dt.UTC,
        )
    raise ValueError(f"cron {cron!r} has {len(fields)} fields, not 5 (or 6 with seconds)")


def parse_entry(text: str) -> Entry:
    from workers.registry import RegistryError, active_key

    series, at, cron = text.strip().partition("@")
    parts = series.strip().split("/")
    if not at or len(parts) != 3 or not all(parts):
        raise ValueError(f"{text.strip()!r} is not feed/symbol/tf@cron")
    feed, symbol, tf = parts
    try:
        Timeframe(tf)
        active_key(feed, symbol, tf)
        cron_trigger(cron)
    except (ValueError, RegistryError) as exc:
        raise ValueError(f"{text.strip()!r}: {exc}") from None
    return Entry(feed, symbol, tf, " ".join(cron.split()))


class Settings(RuntimeSettings):
    postgres_dsn: SecretStr | None = None
    """PostgreSQL of the job store, the run log and the leader lock (hidden in logs)."""
    train_schedule: Annotated[tuple[Entry, ...], NoDecode] = ()
    """``feed/symbol/tf@cron`` entries separated by ``;``."""
    train_window_days: Annotated[float, Field(gt=0)] = 90.0
    train_horizon: Annotated[int, Field(ge=1)] = 12
    train_folds: Annotated[int, Field(ge=1)] = 4
    train_promote: bool = True
    train_out: Path = Path("train-report")
    scheduler_job: str = "workers.trainer.scheduler:train_job"
    """``module:function`` each fire calls with feed, symbol, tf and fire_time."""
    scheduler_misfire_grace_s: Annotated[int, Field(ge=1)] = 3600
    scheduler_coalesce: bool = True
    scheduler_leader_retry_s: Annotated[float, Field(gt=0)] = 5.0
    scheduler_run_lease_s: Annotated[float, Field(gt=0)] = 60.0
    """A claimed run not renewed for this long is taken for dead and run again by the
    leader; a running job renews its claim every quarter of it."""

    @field_validator("train_schedule", mode="before")
    @classmethod
    def _entries(cls, value: object) -> object:
        if isinstance(value, str):
            entries = [parse_entry(part) for part in value.split(";") if part.strip()]
            ids = [e.job_id for e in entries]
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                raise ValueError(f"scheduled twice: {', '.join(twice)}")
            return tuple(entries)
        return value


def train_job(feed: str, symbol: str, tf: str, fire_time: dt.datetime) -> str:
    """One ``tickwire train`` of the window ending at the scheduled fire time."""
    from workers.trainer.cli import outcome_line, train_and_store

    settings = load(Settings)
    stamp = fire_time.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    args = argparse.Namespace(
        feed=feed,
        symbol=symbol,
        tf=tf,
        start=(fire_time - dt.timedelta(days=settings.train_window_days)).isoformat(),
        end=fire_time.isoformat(),
        horizon=settings.train_horizon,
        folds=settings.train_folds,
        out=settings.train_out / f"{feed}_{symbol}_{tf}" / stamp,
        promote=settings.train_promote,
    )
    try:
        outcome = train_and_store(args)
    except SystemExit as exc:  # bad input: the trainer printed its one line, logged with the run
        why = exc.message if isinstance(exc, Refused) else f"tickwire train exited with {exc.code}"
        raise RuntimeError(why) from None
    return outcome_line(outcome)


class SchedulerMetrics(WorkerMetrics):
    def __init__(self) -> None:
        super().__init__("scheduler")
        self.runs = Counter(
            "tickwire_scheduler_runs",
            "Scheduled runs by outcome: ok, failed, missed",
            ["outcome"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "tickwire_scheduler_leader",
            "1 while this scheduler is the active one",
            registry=self.registry,
        )


class RunLog:
    """``scheduler.runs``: one claim per job and fire time (synchronous, like the job store)."""

    def __init__(self, engine: Engine, name: str, metrics: SchedulerMetrics) -> None:
        self.engine, self.name, self.metrics = engine, name, metrics

    def claim(self, job_id: str, fire_time: dt.datetime) -> bool:
        with self.engine.begin() as conn:
            row = conn.execute(
                text(query("scheduler_claim_run")),
                {"job_id": job_id, "fire_time": fire_time, "scheduler": self.name},
            ).first()
        return row is not None

    def missed(self, job_id: str, fire_time: dt.datetime, detail: str) -> None:
        with self.engine.begin() as conn:
            row = conn.execute(
                text(query("scheduler_record_missed")),
                {
                    "job_id": job_id,
                    "fire_time": fire_time,
                    "scheduler": self.name,
                    "detail": detail,
                },
            ).first()
        if row is not None:  # a fire time with a row already was claimed or counted before
            self.metrics.runs.labels("missed").inc()

    def beat(self, job_id: str, fire_time: dt.datetime) -> bool:
        """Renew this scheduler's claim of a run; False when it is not (any longer) its own."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(query("scheduler_beat_run")),
                {"job_id": job_id, "fire_time": fire_time, "scheduler": self.name},
            ).first()
        return row is not None

    def finish(self, job_id: str, fire_time: dt.datetime, outcome: str, detail: str) -> None:
        """Record the outcome of a run this scheduler claims; one another scheduler took over
        meanwhile is left to that one (its outcome is the one recorded)."""
        with self.engine.begin() as conn:
            row = conn.execute(
                text(query("scheduler_finish_run")),
                {
                    "job_id": job_id,
                    "fire_time": fire_time,
                    "scheduler": self.name,
                    "outcome": outcome,
                    "detail": detail,
                },
            ).first()
        if row is None:
            log.warning(
                "%s %s: taken over by another scheduler meanwhile; its outcome (%s: %s) is "
                "not recorded",
                job_id,
                fire_time.isoformat(),
                outcome,
                detail,
            )
            return
        self.metrics.runs.labels(outcome).inc()

    def reclaim(self, lease_s: float) -> list[tuple[str, dt.datetime]]:
        with self.engine.begin() as conn:
            rows = conn.execute(
                text(query("scheduler_reclaim_unfinished")),
                {"scheduler": self.name, "lease_s": lease_s},
            )
            return sorted((str(r.job_id), r.fire_time) for r in rows)


class ClaimingExecutor(BaseExecutor):  # type: ignore[misc]
    """Runs a job only for fire times it claims in the run log, each in a worker thread with
    its fire time as ``fire_time``. The claim is written while APScheduler submits the job,
    before it stores the job's next fire time; the worker thread checks it is still this
    scheduler's before the job starts, renews it while the job runs and records the outcome,
    so all three last as long as the job does, even past the scheduler's event loop."""

    def __init__(self, runs: RunLog, lease_s: float) -> None:
        super().__init__()
        self.runs = runs
        self.lease_s = lease_s
        self.tasks: set[asyncio.Task[None]] = set()
        self.unclaimed: set[str] = set()
        """Jobs whose fire times could not be claimed: their stored next fire time stays."""
        self.broken: Exception | None = None
        self._turns: dict[str, asyncio.Lock] = {}
        """Per job: its runs one after another, in the order they were submitted."""

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._loop: asyncio.AbstractEventLoop = scheduler._eventloop

    def _do_submit_job(self, job: Job, run_times: list[dt.datetime]) -> None:
        try:
            self._claim_and_run(job, run_times)
        except Exception as exc:
            # No claim, no run: keep the job's stored next fire time (see StoreKeepingUnclaimed)
            # and stop scheduling, so that the next scheduler submits these fire times again.
            log.error("could not claim %s at %s: %s", job.id, run_times, exc)
            self.unclaimed.add(job.id)
            self.broken = exc
            self._scheduler.pause()
            raise

    def _claim_and_run(self, job: Job, run_times: list[dt.datetime]) -> None:
        events: list[JobExecutionEvent] = []
        claimed: list[dt.datetime] = []
        now = dt.datetime.now(dt.UTC)
        for fire_time in run_times:
            late = now - fire_time
            if job.misfire_grace_time is not None and late.total_seconds() > job.misfire_grace_time:
                self.runs.missed(job.id, fire_time, f"late by {late}, past the misfire grace")
                events.append(JobExecutionEvent(EVENT_JOB_MISSED, job.id, "default", fire_time))
                log.warning("%s at %s missed by %s", job.id, fire_time, late)
            elif self.runs.claim(job.id, fire_time):
                claimed.append(fire_time)
            else:
                log.info("%s at %s is already claimed: not run again", job.id, fire_time)
        if not claimed:
            self._run_job_success(job.id, events)
            return

        def done(task: asyncio.Task[list[JobExecutionEvent]]) -> None:
            if task.cancelled():
                self._run_job_success(job.id, events)
            elif (exc := task.exception()) is not None:
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, events + task.result())

        task = self._loop.create_task(self.run(job, claimed))
        self._keep(task, done)

    def rerun(self, job: Job, fire_times: list[dt.datetime]) -> None:
        """Run claims a dead scheduler left unfinished (already reclaimed by this one)."""
        self._keep(self._loop.create_task(self.run(job, fire_times)), None)

    def _keep(self, task: asyncio.Task[Any], done: Callable[[Any], None] | None) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if done is not None:
            task.add_done_callback(done)

    async def run(self, job: Job, fire_times: Iterable[dt.datetime]) -> list[JobExecutionEvent]:
        async with self._turns.setdefault(job.id, asyncio.Lock()):
            return await self._run(job, fire_times)

    async def _run(self, job: Job, fire_times: Iterable[dt.datetime]) -> list[JobExecutionEvent]:
        events = []
        for fire_time in fire_times:
            event = await asyncio.to_thread(self._attended, job, fire_time)
            if event is not None:
                events.append(event)
        return events

    def _attended(self, job: Job, fire_time: dt.datetime) -> JobExecutionEvent | None:
        """In a worker thread: run one claimed fire time, renewing the claim while the job
        runs and until its outcome is recorded. None when the claim is no longer this
        scheduler's (taken over after a lease it could not renew): not run here."""
        when = fire_time.isoformat()
        if not _retrying(lambda: self.runs.beat(job.id, fire_time), f"start {job.id} {when}"):
            log.warning("%s for %s was taken over by another scheduler: not run here", job.id, when)
            return None
        done = threading.Event()
        threading.Thread(
            target=self._renew, args=(job.id, fire_time, done), name="claim", daemon=True
        ).start()
        try:
            log.info("running %s for %s", job.id, when)
            try:
                detail = job.func(*job.args, **(job.kwargs | {"fire_time": fire_time}))
            except (Exception, SystemExit) as exc:  # an exit would end the scheduler
                log.exception("%s for %s failed", job.id, when)
                outcome, text_ = "failed", f"{type(exc).__name__}: {exc}"
                event = JobExecutionEvent(
                    EVENT_JOB_ERROR, job.id, "default", fire_time, exception=exc
                )
            else:
                outcome, text_ = "ok", str(detail)
                event = JobExecutionEvent(EVENT_JOB_EXECUTED, job.id, "default", fire_time, detail)
            _retrying(
                lambda: self.runs.finish(job.id, fire_time, outcome, text_),
                f"record {job.id} {when} as {outcome}",
            )
        finally:
            done.set()
        return event

    def _renew(self, job_id: str, fire_time: dt.datetime, done: threading.Event) -> None:
        while not done.wait(self.lease_s / 4):
            try:
                if not self.runs.beat(job_id, fire_time):
                    if not done.is_set():
                        log.error(
                            "%s for %s was taken over by another scheduler while it runs here",
                            job_id,
                            fire_time.isoformat(),
                        )
                    return
            except Exception as exc:
                log.warning("could not renew the claim of %s for %s: %s", job_id, fire_time, exc)

    async def drain(self, limit_s: float) -> None:
        if self.tasks:
            log.info("waiting up to %gs for %d running job(s)", limit_s, len(self.tasks))
            _, running = await asyncio.wait(set(self.tasks), timeout=limit_s)
            if running:
                log.warning(
                    "%d job(s) still running: exiting after they end (signal again to stop now)",
                    len(running),
                )


class StoreKeepingUnclaimed(SQLAlchemyJobStore):  # type: ignore[misc]
    """The job store, except that a job whose fire times were not claimed keeps its stored
    next fire time (APScheduler moves it on even when submitting the job failed)."""

    def __init__(self, executor: ClaimingExecutor, engine: Engine) -> None:
        super().__init__(engine=engine, tablename="apscheduler_jobs", tableschema="scheduler")
        self.executor = executor

    def update_job(self, job: Job) -> None:
        if job.id not in self.executor.unclaimed:
            super().update_job(job)


def sqlalchemy_url(dsn: str) -> str:
    return make_url(dsn).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def max_instances(coalesce: bool) -> int:
    """Runs of one job APScheduler lets wait or run at once (``ClaimingExecutor`` runs them
    one after another): one when coalescing, where a fire time that comes while the last run
    is still going is recorded as missed; without coalescing every fire time waits its turn
    (APScheduler needs a bound: this many is about a week of fire times one minute apart)."""
    return 1 if coalesce else 10_000


def sync_jobs(scheduler: AsyncIOScheduler, settings: Settings) -> None:
    """Make the stored jobs match the schedule. An unchanged job keeps its stored next fire
    time (so fires missed while no scheduler ran are still run); a changed one starts anew."""
    wanted = {e.job_id: e for e in settings.train_schedule}
    instances = max_instances(settings.scheduler_coalesce)
    for job in scheduler.get_jobs():
        if job.id.startswith(JOB_PREFIX) and job.id not in wanted:
            log.info("%s is no longer scheduled: removed", job.id)
            job.remove()
    for job_id, entry in wanted.items():
        trigger = entry.trigger()
        # fire_time is filled in by the executor with each scheduled fire time
        kwargs = {"feed": entry.feed, "symbol": entry.symbol, "tf": entry.tf, "fire_time": None}
        job = scheduler.get_job(job_id)
        if (
            job is not None
            and repr(job.trigger) == repr(trigger)
            and str(job.trigger.timezone) == str(trigger.timezone)
            and job.func_ref == settings.scheduler_job
            and job.kwargs == kwargs
            and job.coalesce == settings.scheduler_coalesce
            and job.misfire_grace_time == settings.scheduler_misfire_grace_s
        ):
            if job.max_instances != instances:  # how overlapping runs wait: next fire time kept
                job.modify(max_instances=instances)
            continue
        scheduler.add_job(
            settings.scheduler_job,
            trigger,
            id=job_id,
            name=job_id,
            kwargs=kwargs,
            coalesce=settings.scheduler_coalesce,
            misfire_grace_time=settings.scheduler_misfire_grace_s,
            max_instances=instances,
            replace_existing=True,
        )
        log.info("%s scheduled: %s", job_id, entry.cron)


def _record_skipped(runs: RunLog) -> Callable[[JobSubmissionEvent], None]:
    def listener(event: JobSubmissionEvent) -> None:
        for fire_time in event.scheduled_run_times:
            runs.missed(event.job_id, fire_time, "the previous run was still running")

    return listener


def _retrying(call: Callable[[], Any], what: str, attempts: int = 5) -> Any:
    """``call()``, tried again after 1, 2, 4, 8 s when the database cannot be reached."""
    for attempt in range(attempts):
        try:
            return call()
        except SQLAlchemyError as exc:
            if attempt == attempts - 1:
                raise
            log.warning("could not %s (%s); trying again", what, exc)
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait for ``stop`` at most ``seconds``; True if it is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def serve(settings: Settings, stop: asyncio.Event, name: str) -> int:
    """Wait for leadership, then schedule until ``stop``; 1 if the leader lock was lost."""
    assert settings.postgres_dsn is not None
    dsn = settings.postgres_dsn.get_secret_value()
    metrics = SchedulerMetrics()
    connected = asyncio.Event()  # /healthz: connected to PostgreSQL, active or waiting to be
    server = MetricsServer(metrics, connected.is_set, settings.metrics_host, settings.metrics_port)
    await server.start()
    try:
        lock = await asyncpg.connect(dsn)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        await server.stop()
        fail(f"cannot reach PostgreSQL: {exc}")
    try:
        if not await lock.fetchval(query("scheduler_tables_exist")):
            fail("no scheduler tables in this database: run tickwire db migrate")
        up = metrics.up.labels(metrics.worker)
        up.set(1)
        connected.set()
        waiting_logged = False
        while True:
            try:
                if await lock.fetchval(query("scheduler_try_leadership"), LOCK_NAME):
                    break
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # not the leader: nothing to give up; wait on with a new connection
                log.warning("%s: lost the connection while waiting (%s); connecting again",
                            name, exc)  # fmt: skip
                lock.terminate()
                up.set(0)
                connected.clear()
                lock = await _connect_again(dsn, stop, settings.scheduler_leader_retry_s)
                if lock is None:
                    return 0
                up.set(1)
                connected.set()
                continue
            if not waiting_logged:
                log.info("%s: another scheduler is active; retrying every %gs", name,
                         settings.scheduler_leader_retry_s)  # fmt: skip
                waiting_logged = True
            if await _wait(stop, settings.scheduler_leader_retry_s):
                return 0
        log.info("%s: active scheduler", name)
        metrics.leader.set(1)
        return await _lead(settings, stop, name, lock, metrics)
    finally:
        metrics.leader.set(0)
        metrics.up.labels(metrics.worker).set(0)
        if lock is not None:
            await lock.close()
        await server.stop()


async def _connect_again(dsn: str, stop: asyncio.Event, retry_s: float) -> Any:
    """A new connection, tried every ``retry_s`` until one is made; None once ``stop``."""
    while True:
        try:
            return await asyncpg.connect(dsn)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cannot reach PostgreSQL (%s); trying again in %gs", exc, retry_s)
        if await _wait(stop, retry_s):
            return None


async def _lead(
    settings: Settings, stop: asyncio.Event, name: str, lock: Any, metrics: SchedulerMetrics
) -> int:
    assert settings.postgres_dsn is not None
    engine = create_engine(sqlalchemy_url(settings.postgres_dsn.get_secret_value()))
    runs = RunLog(engine, name, metrics)
    executor = ClaimingExecutor(runs, settings.scheduler_run_lease_s)
    scheduler = AsyncIOScheduler(
        jobstores={"default": StoreKeepingUnclaimed(executor, engine)},
        executors={"default": executor},
        timezone=dt.UTC,
    )
    scheduler.add_listener(_record_skipped(runs), EVENT_JOB_MAX_INSTANCES)
    code = 0
    try:
        scheduler.start(paused=True)
        sync_jobs(scheduler, settings)

        async def take_over() -> None:
            left = await asyncio.to_thread(runs.reclaim, settings.scheduler_run_lease_s)
            for job_id, fire_time in left:
                job = scheduler.get_job(job_id)
                if job is None:
                    await asyncio.to_thread(
                        runs.finish, job_id, fire_time, "failed", "no longer scheduled"
                    )
                else:
                    log.info("%s for %s was left unfinished: running it again", job_id, fire_time)
                    executor.rerun(job, [fire_time])

        await take_over()
        scheduler.resume()
        while not await _wait(stop, settings.scheduler_leader_retry_s):
            if executor.broken is not None:
                log.error("%s: stopping, a restart runs the unclaimed fire times", name)
                code = 1
                break
            try:
                await lock.fetchval("SELECT 1")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.error("%s: lost the leader lock's connection (%s): stopping", name, exc)
                code = 1
                break
            try:  # runs of a scheduler that died inside them, once their lease ran out
                await take_over()
            except SQLAlchemyError as exc:
                log.warning("could not look for runs left unfinished: %s", exc)
    finally:
        if scheduler.running:
            scheduler.shutdown(wait=False)
        await executor.drain(settings.drain_timeout_s)
        engine.dispose()
    return code


def main() -> int:
    settings = load(Settings)
    if settings.postgres_dsn is None:
        fail("no PostgreSQL DSN: set TICKWIRE_POSTGRES_DSN")
    if not settings.train_schedule:
        fail("nothing to schedule: set TICKWIRE_TRAIN_SCHEDULE to feed/symbol/tf@cron entries")
    try:
        func = ref_to_obj(settings.scheduler_job)
    except (ValueError, LookupError, TypeError) as exc:
        fail(f"TICKWIRE_SCHEDULER_JOB: {exc}")
    if not callable(func):
        fail(f"TICKWIRE_SCHEDULER_JOB: {settings.scheduler_job} is not callable")
    if func is train_job:  # each run writes its report there: checked now, not at a fire time
        try:
            settings.train_out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=settings.train_out).close()
        except OSError as exc:
            fail(f"TICKWIRE_TRAIN_OUT {settings.train_out}: {exc.strerror or exc}")
    # unique to this start: a container restarted after a crash has the same host name and
    # pid (1), and a run left unfinished under the same name would never be taken over
    name = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    async def go() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if not stop.is_set():
                stop.set()
                return
            # a job thread would keep the process to the job's end: as kill -9, by design safe
            log.warning("%s: stopping now; the next scheduler runs what was left", name)
            os._exit(1)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        return await serve(settings, stop, name)

    return asyncio.run(go())
