"""``tickwire run scheduler`` against a real PostgreSQL (and, for the real job, NATS).

Schedulers run as subprocesses of the console script, each test in its own database. The
trivial job of ``tests.scheduler_job`` appends a line per call to a file, independently of
the scheduler's own run log, so a run done twice or not at all shows in the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from nats.js import JetStreamContext

from db.migrate import migrate
from db.queries import query
from infra.stack import LocalStack
from tests.integration.test_tickwire_train import FEED, SYMBOL, TF, candles_db, namespace
from tests.processes import free_port, tail
from tests.trainer_market import M5_MS
from tests.waiting import eventually
from workers.registry import Registry
from workers.trainer.scheduler import LOCK_NAME

pytestmark = pytest.mark.integration
__all__ = ["candles_db", "namespace"]  # fixtures shared with the trainer's tests

ROOT = Path(__file__).resolve().parents[2]
JOB = "train:demo/EURUSD/M5"


def scheduler_env(dsn: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_POSTGRES_DSN": dsn,
        "TICKWIRE_TRAIN_SCHEDULE": f"{FEED}/{SYMBOL}/{TF}@* * * * * *",  # every second
        "TICKWIRE_SCHEDULER_LEADER_RETRY_S": "0.2",
        "TICKWIRE_SCHEDULER_RUN_LEASE_S": "2",
        "TICKWIRE_LOG_LEVEL": "INFO",
        **extra,
    }


@contextlib.contextmanager
def schedulers(log_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Started schedulers; whatever is still running at the end is killed."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def spawn(
    procs: list[subprocess.Popen[bytes]], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "run", "scheduler"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    procs.append(proc)
    return proc


def recorded(path: Path) -> list[tuple[int, int]]:
    """(fire time in epoch seconds, pid) of every call of the trivial job."""
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    assert all(r[0] == f"{FEED}/{SYMBOL}/{TF}" for r in rows)
    return [(int(r[1]), int(r[2])) for r in rows]


async def run_log(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT * FROM scheduler.runs ORDER BY fire_time")
    finally:
        await conn.close()


def alive(proc: subprocess.Popen[bytes], log: Path) -> None:
    if proc.poll() is not None:
        raise AssertionError(f"scheduler exited with {proc.returncode}: {log.read_text()[-2000:]}")


def stop_cleanly(proc: subprocess.Popen[bytes], log: Path, *, within_s: float) -> None:
    """SIGTERM; the scheduler must exit with 0 within ``within_s``."""
    proc.terminate()
    if proc.wait(timeout=within_s) != 0:
        raise AssertionError(f"scheduler exited with {proc.returncode}: {tail(log)}")


def runs_by(proc: subprocess.Popen[bytes], runs: Path) -> int:
    """How many runs the job recorded in ``runs`` ran in ``proc``."""
    return sum(pid == proc.pid for _, pid in recorded(runs))


async def three_runs(
    tmp_path: Path, env: dict[str, str], log: Path, runs: Path, *, within_s: float
) -> None:
    """One scheduler until its job has recorded three runs, then stopped by SIGTERM."""
    with schedulers(tmp_path) as procs:
        proc = spawn(procs, env, log)

        def three_ran() -> bool:
            alive(proc, log)
            return len(recorded(runs)) >= 3

        await eventually(three_ran, timeout=within_s, what="three runs")
        stop_cleanly(proc, log, within_s=within_s)


async def unfinished_run(
    conn: asyncpg.Connection, proc: subprocess.Popen[bytes], log: Path
) -> dt.datetime | None:
    """The fire time of the run a scheduler is inside (claimed, not finished); None if none.
    Fails if the scheduler exited."""
    alive(proc, log)
    return await conn.fetchval(  # type: ignore[no-any-return]
        "SELECT fire_time FROM scheduler.runs WHERE finished_at IS NULL"
    )


async def test_one_scheduler_runs_and_a_takeover_or_restart_neither_loses_nor_doubles(
    pg_dsn: str, tmp_path: Path
) -> None:
    await migrate(pg_dsn)
    runs = tmp_path / "runs.txt"
    env = scheduler_env(
        pg_dsn,
        TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record",
        TICKWIRE_SCHEDULER_COALESCE="false",  # every missed fire time must run, once
        TICKWIRE_SCHEDULER_MISFIRE_GRACE_S="120",
        SCHEDULER_TEST_RUNS=str(runs),
    )
    logs = {n: tmp_path / f"{n}.log" for n in "abc"}

    def ran_by(proc: subprocess.Popen[bytes], log: Path) -> int:
        alive(proc, log)
        return runs_by(proc, runs)

    with schedulers(tmp_path) as procs:
        a = spawn(procs, env, logs["a"])
        await eventually(lambda: ran_by(a, logs["a"]) >= 2, timeout=30, what="a runs jobs")
        b = spawn(procs, env, logs["b"])
        await eventually(
            lambda: "another scheduler is active" in logs["b"].read_text(), what="b waits"
        )
        seen = ran_by(a, logs["a"])
        await eventually(lambda: ran_by(a, logs["a"]) >= seen + 3, what="a goes on")
        assert ran_by(b, logs["b"]) == 0  # two started, one active

        a.kill()  # the leader dies at an arbitrary moment; its lock dies with its connection
        a.wait()
        await eventually(lambda: ran_by(b, logs["b"]) >= 3, timeout=30, what="b takes over")
        b.send_signal(signal.SIGTERM)
        assert b.wait(timeout=30) == 0, logs["b"].read_text()[-2000:]
        stopped = time.time()
        # fire times pass while no scheduler runs: the next one must still run each of them
        await eventually(lambda: time.time() >= stopped + 3, what="three fire times missed")
        c = spawn(procs, env, logs["c"])
        await eventually(lambda: ran_by(c, logs["c"]) >= 6, timeout=30, what="c catches up")
        stop_cleanly(c, logs["c"], within_s=30)

    calls = recorded(runs)
    fires = Counter(fire for fire, _ in calls)
    log_rows = {int(r["fire_time"].timestamp()): r for r in await run_log(pg_dsn)}
    # nothing lost: one fire time each second from the first to the last, all finished
    assert sorted(fires) == list(range(min(fires), max(fires) + 1))
    assert sorted(log_rows) == sorted(fires)
    assert {(r["job_id"], r["outcome"]) for r in log_rows.values()} == {(JOB, "ok")}
    # nothing doubled, except a run the killed leader was inside: run again, and logged so
    for fire, n in fires.items():
        assert n == log_rows[fire]["attempts"], (fire, n, dict(log_rows[fire]))
        assert n == 1 or next(pid for f, pid in calls if f == fire) == a.pid
    assert sum(fires.values()) - len(fires) <= 1
    # one active scheduler at a time: a's runs, then b's, then c's, never interleaved
    owners = [pid for _, pid in sorted(calls)]
    blocks = [pid for i, pid in enumerate(owners) if i == 0 or owners[i - 1] != pid]
    assert blocks == [a.pid, b.pid, c.pid]
    # c ran the fire times that passed while none was running
    first_c = min(f for f, pid in calls if pid == c.pid)
    assert first_c < stopped + 3
    assert first_c == max(f for f, pid in calls if pid == b.pid) + 1


async def test_an_active_and_a_waiting_scheduler_both_say_they_are_up(
    pg_dsn: str, tmp_path: Path
) -> None:
    """tickwire_up, the dashboard's "Workers up" and its worker list, counts the scheduler;
    tickwire_scheduler_leader tells the active one from the one waiting."""
    await migrate(pg_dsn)
    runs = tmp_path / "runs.txt"
    ports = {n: free_port() for n in "ab"}
    logs = {n: tmp_path / f"{n}.log" for n in "ab"}

    def env(n: str) -> dict[str, str]:
        return scheduler_env(
            pg_dsn,
            TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record",
            SCHEDULER_TEST_RUNS=str(runs),
            TICKWIRE_METRICS_PORT=str(ports[n]),
        )

    def metrics(n: str) -> dict[str, float]:
        url = f"http://127.0.0.1:{ports[n]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        found = re.findall(r'^(tickwire_up\{worker="scheduler"\}|tickwire_scheduler_leader) (\S+)$',
                           text, re.M)  # fmt: skip
        return {name: float(value) for name, value in found}

    with schedulers(tmp_path) as procs:
        a = spawn(procs, env("a"), logs["a"])
        await eventually(lambda: len(recorded(runs)) >= 1, timeout=30, what="a runs jobs")
        b = spawn(procs, env("b"), logs["b"])
        await eventually(
            lambda: "another scheduler is active" in logs["b"].read_text(), what="b waits"
        )
        alive(a, logs["a"])
        alive(b, logs["b"])
        got = {n: await asyncio.to_thread(metrics, n) for n in "ab"}
    up = 'tickwire_up{worker="scheduler"}'
    assert got["a"] == {up: 1.0, "tickwire_scheduler_leader": 1.0}
    assert got["b"] == {up: 1.0, "tickwire_scheduler_leader": 0.0}


@pytest.mark.parametrize("coalesce", [False, True])
async def test_a_fire_time_that_comes_while_its_job_still_runs(
    pg_dsn: str, tmp_path: Path, coalesce: bool
) -> None:
    """A job that takes longer than the interval between its fire times: without coalescing
    each fire time waits its turn and runs once, in order; with it, one that came while the
    last run was going is recorded as missed, not run."""
    await migrate(pg_dsn)
    runs, log = tmp_path / "runs.txt", tmp_path / "scheduler.log"
    env = scheduler_env(
        pg_dsn,
        TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record_slowly",
        TICKWIRE_SCHEDULER_COALESCE=str(coalesce).lower(),
        TICKWIRE_SCHEDULER_MISFIRE_GRACE_S="120",
        SCHEDULER_TEST_RUNS=str(runs),
        SCHEDULER_TEST_JOB_S="1.5",  # fire times every second
    )

    await three_runs(tmp_path, env, log, runs, within_s=60)

    fires = [fire for fire, _ in recorded(runs)]
    rows = {int(r["fire_time"].timestamp()): r for r in await run_log(pg_dsn)}
    outcomes = {fire: r["outcome"] for fire, r in rows.items()}
    missed = sorted(fire for fire, outcome in outcomes.items() if outcome == "missed")
    assert fires == sorted(set(fires))  # one at a time, in order, none twice
    if coalesce:  # (fire times due at once, after a stall, are coalesced and have no row)
        assert missed, "no fire time came while a run was going"
        assert {rows[f]["detail"] for f in missed} == {"the previous run was still running"}
        assert not set(missed) & set(fires)
    else:
        assert missed == []
        assert sorted(rows) == list(range(fires[0], max(rows) + 1))  # each fire time has a row
        assert fires == list(range(fires[0], fires[-1] + 1))  # every fire time, in turn
        # what still waited when it stopped is claimed, left unfinished for the next leader
        assert all(outcomes[f] == "ok" for f in fires[:-1])
        assert all(outcomes[f] is None for f in rows if f > fires[-1])


async def test_a_leader_that_loses_its_lock_finishes_its_run_and_the_next_does_not_double_it(
    pg_dsn: str, tmp_path: Path
) -> None:
    """The leader's lock connection drops (network, idle kill) while its job runs: it stops
    scheduling but the job goes on to its end. The next leader must not run the same fire
    time beside it, and must run every later one."""
    await migrate(pg_dsn)
    runs = tmp_path / "runs.txt"
    env = scheduler_env(
        pg_dsn,
        TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record_slowly",
        TICKWIRE_SCHEDULER_COALESCE="true",
        TICKWIRE_SCHEDULER_MISFIRE_GRACE_S="120",
        SCHEDULER_TEST_RUNS=str(runs),
        SCHEDULER_TEST_JOB_S="4",  # twice the lease: renewed, or taken over
    )
    la, lb = tmp_path / "a.log", tmp_path / "b.log"
    conn = await asyncpg.connect(pg_dsn)
    try:
        with schedulers(tmp_path) as procs:
            a = spawn(procs, env, la)

            await eventually(lambda: unfinished_run(conn, a, la), timeout=30, what="a inside a run")
            b = spawn(procs, env, lb)
            await eventually(
                lambda: lb.exists() and "another scheduler is active" in lb.read_text(),
                what="b waits",
            )
            killed = await conn.fetchval(  # a's lock connection goes; a itself lives on
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND granted"
            )
            assert killed
            await eventually(lambda: a.poll() is not None, timeout=60, what="a stops")
            assert "lost the leader lock's connection" in la.read_text()
            await eventually(
                lambda: runs_by(b, runs) >= 2,
                timeout=60,
                what="b runs jobs",
            )
            stop_cleanly(b, lb, within_s=60)
    finally:
        await conn.close()
    calls = recorded(runs)
    fires = Counter(fire for fire, _ in calls)
    assert [f for f, n in fires.items() if n > 1] == [], calls
    assert {pid for _, pid in calls} == {a.pid, b.pid}
    rows = {int(r["fire_time"].timestamp()): r for r in await run_log(pg_dsn)}
    for fire in fires:
        assert rows[fire]["outcome"] == "ok"
        assert rows[fire]["attempts"] == 1
    assert max(f for f, pid in calls if pid == a.pid) < min(f for f, pid in calls if pid == b.pid)


async def test_a_job_that_exits_is_a_failed_run_and_the_scheduler_goes_on(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A job calls sys.exit() (a command-line function used as the job): its run is recorded
    as failed, and the scheduler runs the next fire times."""
    await migrate(pg_dsn)
    runs, log = tmp_path / "runs.txt", tmp_path / "scheduler.log"
    env = scheduler_env(
        pg_dsn,
        TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record_and_exit",
        SCHEDULER_TEST_RUNS=str(runs),
    )

    await three_runs(tmp_path, env, log, runs, within_s=30)

    rows = {int(r["fire_time"].timestamp()): r for r in await run_log(pg_dsn)}
    for fire, _ in recorded(runs):
        assert (rows[fire]["outcome"], rows[fire]["detail"]) == ("failed", "SystemExit: 3")


async def test_a_second_signal_stops_a_scheduler_that_waits_for_its_job(
    pg_dsn: str, tmp_path: Path
) -> None:
    """SIGTERM lets the job it is inside go on to its end; a second SIGTERM (or Ctrl-C)
    stops it at once, and the run is left to the next scheduler, as after kill -9."""
    await migrate(pg_dsn)
    log = tmp_path / "scheduler.log"
    env = scheduler_env(
        pg_dsn,
        TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record_slowly",
        TICKWIRE_DRAIN_TIMEOUT_S="1",
        SCHEDULER_TEST_RUNS=str(tmp_path / "runs.txt"),
        SCHEDULER_TEST_JOB_S="600",
    )
    conn = await asyncpg.connect(pg_dsn)
    try:
        with schedulers(tmp_path) as procs:
            proc = spawn(procs, env, log)

            await eventually(
                lambda: unfinished_run(conn, proc, log), timeout=30, what="inside a run"
            )
            proc.send_signal(signal.SIGTERM)

            async def lock_released() -> bool:  # the drain is over, the job still runs
                return not await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                )

            await eventually(lock_released, timeout=30, what="the drain to end")
            assert proc.poll() is None  # the job goes on
            proc.send_signal(signal.SIGINT)
            await eventually(lambda: proc.poll() is not None, timeout=30, what="the exit")
        unfinished = await conn.fetchval(
            "SELECT count(*) FROM scheduler.runs WHERE finished_at IS NULL"
        )
    finally:
        await conn.close()
    assert unfinished == 1
    assert "stopping now" in log.read_text()


async def test_a_waiting_scheduler_that_loses_its_connection_waits_on_and_takes_over(
    pg_dsn: str, tmp_path: Path
) -> None:
    """The connection of a scheduler waiting to lead drops (a PostgreSQL restart, an idle
    kill): it connects again and goes on waiting, and takes over when the leader dies."""
    await migrate(pg_dsn)
    runs = tmp_path / "runs.txt"
    env = scheduler_env(
        pg_dsn, TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record", SCHEDULER_TEST_RUNS=str(runs)
    )
    la, lb = tmp_path / "a.log", tmp_path / "b.log"
    conn = await asyncpg.connect(pg_dsn)
    try:
        with schedulers(tmp_path) as procs:
            a = spawn(procs, env, la)
            await eventually(lambda: len(recorded(runs)) >= 1, timeout=30, what="a runs jobs")
            b = spawn(procs, env, lb)
            await eventually(
                lambda: lb.exists() and "another scheduler is active" in lb.read_text(),
                what="b waits",
            )
            killed = await conn.fetchval(  # b's connection: the one without the advisory lock
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND query LIKE '%pg_try_advisory_lock%'"
                " AND pid NOT IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory')"
            )
            assert killed
            await eventually(
                lambda: "connecting again" in lb.read_text() or b.poll() is not None,
                what="b to notice",
            )
            a.kill()
            a.wait()
            await eventually(
                lambda: alive(b, lb) or runs_by(b, runs) >= 2,
                timeout=30,
                what="b takes over",
            )
            stop_cleanly(b, lb, within_s=30)
    finally:
        await conn.close()


def health(port: int) -> int:
    """The status /healthz answers with."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_healthz_says_whether_a_scheduler_is_connected(
    local_stack: LocalStack, pg_dsn: str, unique: str, tmp_path: Path
) -> None:
    """A waiting scheduler whose connection drops and cannot be made again (PostgreSQL
    refuses its role) answers /healthz with 503 and sets tickwire_up to 0 until it is
    connected again."""
    await migrate(pg_dsn)
    postgres = local_stack.postgres
    assert postgres is not None
    role = f"{unique}_scheduler"  # roles are cluster-wide: one of this test's own
    postgres.psql('CREATE ROLE :"role" LOGIN IN ROLE postgres;', role=role)
    port = free_port()
    env = scheduler_env(
        pg_dsn.replace("postgresql://postgres@", f"postgresql://{role}@", 1),
        TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record",
        SCHEDULER_TEST_RUNS=str(tmp_path / "runs.txt"),
        TICKWIRE_METRICS_PORT=str(port),
    )
    log = tmp_path / "s.log"
    holder = await asyncpg.connect(pg_dsn)  # holds the leader lock: the scheduler waits
    try:
        assert await holder.fetchval(query("scheduler_try_leadership"), LOCK_NAME)
        with schedulers(tmp_path) as procs:
            proc = spawn(procs, env, log)
            await eventually(
                lambda: log.exists() and "another scheduler is active" in log.read_text(),
                what="the scheduler waits",
            )
            assert health(port) == 200
            await holder.execute(f'ALTER ROLE "{role}" NOLOGIN')
            assert await holder.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
                role,
            )
            await eventually(lambda: health(port) == 503, what="503 while not connected")
            assert up_value(port) == 0
            alive(proc, log)
            await holder.execute(f'ALTER ROLE "{role}" LOGIN')
            await eventually(lambda: health(port) == 200, what="200 once connected again")
            assert up_value(port) == 1
            stop_cleanly(proc, log, within_s=30)
    finally:
        await holder.close()
        postgres.psql('DROP ROLE IF EXISTS :"role";', role=role)


def up_value(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(r'^tickwire_up\{worker="scheduler"\} (\S+)$', text, re.M)
    assert found, "no tickwire_up of the scheduler"
    return float(found.group(1))


SAME_HOST_AND_PID = (  # as in a container restarted after a crash: pid 1, the same host name
    "import os, socket, sys\n"
    "os.getpid = lambda: 1\n"
    "socket.gethostname = lambda: 'scheduler-container'\n"
    "from workers.cli import main\n"
    "sys.exit(main(['run', 'scheduler']))\n"
)


async def test_a_scheduler_restarted_with_the_same_host_and_pid_runs_the_run_it_died_in(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A scheduler is killed inside a run (OOM, kill -9) and its container restarts it: the
    same host name, the same pid 1. The run left unfinished is run again, not taken for one
    the new scheduler is inside itself."""
    await migrate(pg_dsn)
    env = scheduler_env(
        pg_dsn,
        TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record_slowly",
        TICKWIRE_SCHEDULER_MISFIRE_GRACE_S="120",
        SCHEDULER_TEST_RUNS=str(tmp_path / "runs.txt"),
        SCHEDULER_TEST_JOB_S="600",
    )
    la, lb = tmp_path / "a.log", tmp_path / "b.log"

    def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", SAME_HOST_AND_PID],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        procs.append(proc)
        return proc

    conn = await asyncpg.connect(pg_dsn)
    try:
        with schedulers(tmp_path) as procs:
            a = start(env, la)

            fire = await eventually(
                lambda: unfinished_run(conn, a, la), timeout=30, what="a inside a run"
            )
            a.kill()
            a.wait()
            b = start(env | {"SCHEDULER_TEST_JOB_S": "0"}, lb)

            async def finished() -> asyncpg.Record | None:
                alive(b, lb)
                return await conn.fetchrow(  # type: ignore[no-any-return]
                    "SELECT * FROM scheduler.runs WHERE fire_time = $1 AND finished_at IS NOT NULL",
                    fire,
                )

            row = await eventually(finished, timeout=30, what="the run a died in to be run")
            stop_cleanly(b, lb, within_s=30)
    finally:
        await conn.close()
    assert (row["outcome"], row["attempts"]) == ("ok", 2)


REFUSE_CLAIMS = """
CREATE FUNCTION scheduler.refuse_claims() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'claims refused';
END $$;
CREATE TRIGGER refuse_claims BEFORE INSERT ON scheduler.runs
    FOR EACH ROW EXECUTE FUNCTION scheduler.refuse_claims();
"""


async def test_a_fire_time_that_cannot_be_claimed_is_run_after_the_restart(
    pg_dsn: str, tmp_path: Path
) -> None:
    """The run log refuses claims under a running scheduler: it stops, keeping the job's
    stored next fire time, and the next scheduler runs that fire time and every later one,
    once. (Claims only: a run whose finish cannot be recorded is run again by the next
    scheduler, by design, as that of a scheduler that died.)"""
    await migrate(pg_dsn)
    runs = tmp_path / "runs.txt"
    env = scheduler_env(
        pg_dsn,
        TICKWIRE_SCHEDULER_JOB="tests.scheduler_job:record",
        TICKWIRE_SCHEDULER_COALESCE="false",
        TICKWIRE_SCHEDULER_MISFIRE_GRACE_S="120",
        SCHEDULER_TEST_RUNS=str(runs),
    )
    logs = {n: tmp_path / f"{n}.log" for n in "ab"}
    conn = await asyncpg.connect(pg_dsn)
    try:
        with schedulers(tmp_path) as procs:
            a = spawn(procs, env, logs["a"])
            await eventually(lambda: len(recorded(runs)) >= 2, timeout=30, what="a runs jobs")
            await conn.execute(REFUSE_CLAIMS)
            await eventually(lambda: a.poll() is not None, timeout=30, what="a stops")
            assert a.returncode == 1
            assert "could not claim train:demo/EURUSD/M5" in logs["a"].read_text()
            last_a = max(f for f, _ in recorded(runs))
            await conn.execute("DROP TRIGGER refuse_claims ON scheduler.runs")
            b = spawn(procs, env, logs["b"])
            await eventually(lambda: runs_by(b, runs) >= 3, what="b runs")
            stop_cleanly(b, logs["b"], within_s=30)
    finally:
        await conn.close()

    calls = recorded(runs)
    fires = Counter(f for f, _ in calls)
    assert set(fires.values()) == {1}
    assert sorted(fires) == list(range(min(fires), max(fires) + 1))
    assert min(f for f, pid in calls if pid == b.pid) == last_a + 1
    assert {int(r["fire_time"].timestamp()) for r in await run_log(pg_dsn)} == set(fires)


async def test_a_training_that_refuses_its_input_is_logged_with_its_reason(
    pg_dsn: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """``tickwire train`` stops with one line (here: no candles in the window); the run log
    says that line, not only that it exited."""
    await migrate(pg_dsn)
    log = tmp_path / "scheduler.log"
    env = scheduler_env(
        pg_dsn,
        TICKWIRE_NATS_URL=nats_url,
        TICKWIRE_NAMESPACE=namespace,
        TICKWIRE_TRAIN_OUT=str(tmp_path / "reports"),
    )
    conn = await asyncpg.connect(pg_dsn)
    try:
        with schedulers(tmp_path) as procs:
            proc = spawn(procs, env, log)

            async def failed() -> str | None:
                alive(proc, log)
                return await conn.fetchval(  # type: ignore[no-any-return]
                    "SELECT detail FROM scheduler.runs WHERE outcome = 'failed' LIMIT 1"
                )

            detail = await eventually(failed, timeout=60, what="a failed run")
            stop_cleanly(proc, log, within_s=60)
    finally:
        await conn.close()
    assert detail.startswith(f"RuntimeError: no candles for {FEED} {SYMBOL} {TF} in ["), detail


async def test_the_scheduled_job_trains_the_window_ending_at_its_fire_time(
    candles_db: str, nats_url: str, namespace: str, js: JetStreamContext, tmp_path: Path
) -> None:
    env = scheduler_env(
        candles_db,
        TICKWIRE_TRAIN_SCHEDULE=f"{FEED}/{SYMBOL}/{TF}@*/5 * * * * *",
        TICKWIRE_NATS_URL=nats_url,
        TICKWIRE_NAMESPACE=namespace,
        TICKWIRE_TRAIN_WINDOW_DAYS="36500",  # every stored candle
        TICKWIRE_TRAIN_HORIZON="3",
        TICKWIRE_TRAIN_OUT=str(tmp_path / "reports"),
        TICKWIRE_METRICS_PORT=str(port := free_port()),
    )
    log = tmp_path / "scheduler.log"

    async def finished() -> list[asyncpg.Record]:
        alive(proc, log)
        return [r for r in await run_log(candles_db) if r["finished_at"] is not None]

    async def two_finished() -> list[asyncpg.Record] | None:
        done = await finished()
        return done if len(done) >= 2 else None

    with schedulers(tmp_path) as procs:
        proc = spawn(procs, env, log)
        first, second, *_ = await eventually(two_finished, timeout=240, what="two runs")
        url = f"http://127.0.0.1:{port}/metrics"
        metrics = (await asyncio.to_thread(urllib.request.urlopen, url, timeout=10)).read()
        stop_cleanly(proc, log, within_s=60)

    assert (first["outcome"], second["outcome"]) == ("ok", "ok")
    # the same candles again: the same model, already active, and the run log says so
    assert re.fullmatch(r"promoted (\S+): .+", first["detail"]), dict(first)
    assert re.fullmatch(r"model (\S+): \1 is already active: nothing changed", second["detail"])
    fire: dt.datetime = first["fire_time"]
    assert fire.timestamp() % 5 == 0
    assert b"tickwire_scheduler_leader 1.0" in metrics
    ok = re.search(rb'tickwire_scheduler_runs_total\{outcome="ok"\} (\S+)', metrics)
    assert ok is not None
    assert float(ok[1]) >= 1
    registry = await Registry.open(js, namespace=namespace, create=False)
    active = await registry.active(FEED, SYMBOL, TF)
    assert active is not None
    card, _ = await registry.get(active.version)
    # the window ends at the fire time and so covers every stored candle
    conn = await asyncpg.connect(candles_db)
    try:
        lo, hi = await conn.fetchrow("SELECT min(open_time), max(open_time) FROM market.candles")
    finally:
        await conn.close()
    assert card.train_from_ms == int(lo.timestamp() * 1000)
    assert card.train_to_ms == int(hi.timestamp() * 1000) + M5_MS
    stamp = fire.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    report = json.loads(
        (tmp_path / "reports" / f"{FEED}_{SYMBOL}_{TF}" / stamp / "report.json").read_text()
    )
    assert report["holdout"]["auc"] == pytest.approx(card.metrics["auc"], abs=1e-12)


async def test_a_run_taken_over_gets_the_outcome_of_the_scheduler_that_took_it(
    pg_dsn: str,
) -> None:
    """A scheduler that stopped renewing its claim (stalled, not dead) may still finish the
    run after the leader took it over: the run log keeps the outcome of the one it is
    claimed by, whichever finishes first."""
    from sqlalchemy import create_engine

    from workers.trainer.scheduler import RunLog, SchedulerMetrics, sqlalchemy_url

    await migrate(pg_dsn)
    engine = create_engine(sqlalchemy_url(pg_dsn))
    try:
        stalled = RunLog(engine, "stalled", SchedulerMetrics())
        leader = RunLog(engine, "leader", SchedulerMetrics())
        fire = dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.UTC)
        assert stalled.claim("train:demo/EURUSD/M5", fire)
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute("UPDATE scheduler.runs SET heartbeat_at = now() - interval '1 hour'")
            assert leader.reclaim(lease_s=60) == [("train:demo/EURUSD/M5", fire)]
            stalled.finish("train:demo/EURUSD/M5", fire, "ok", "promoted v-stalled")
            leader.finish("train:demo/EURUSD/M5", fire, "failed", "exited with 1")
            row = await conn.fetchrow("SELECT scheduler, outcome, detail FROM scheduler.runs")
        finally:
            await conn.close()
    finally:
        engine.dispose()
    assert dict(row) == {"scheduler": "leader", "outcome": "failed", "detail": "exited with 1"}
