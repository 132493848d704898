-- The training scheduler's own state, apart from the market data.
CREATE SCHEMA scheduler;
REVOKE ALL ON SCHEMA scheduler FROM PUBLIC;

-- APScheduler 3's SQLAlchemyJobStore table, exactly as it would create it: one row per
-- scheduled job, its pickled state and its next fire time (epoch seconds). A restarted or
-- newly elected scheduler carries on from here, missed fire times included.
CREATE TABLE scheduler.apscheduler_jobs (
    id            varchar(191)     NOT NULL,
    next_run_time double precision,
    job_state     bytea            NOT NULL,
    CONSTRAINT apscheduler_jobs_pkey PRIMARY KEY (id)
);
CREATE INDEX ix_scheduler_apscheduler_jobs_next_run_time
    ON scheduler.apscheduler_jobs (next_run_time);

-- One row per job and scheduled fire time, claimed before the job starts: a second claim
-- of the same fire time (a restart that replays a fire, a second scheduler) finds the row
-- and does not run the job again. A row without finished_at is a run its scheduler died in;
-- the next leader runs it again.
CREATE TABLE scheduler.runs (
    job_id      text        NOT NULL,
    fire_time   timestamptz NOT NULL,
    scheduler   text        NOT NULL,
    attempts    integer     NOT NULL DEFAULT 1,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text,
    detail      text,
    CONSTRAINT runs_pkey PRIMARY KEY (job_id, fire_time),
    CONSTRAINT runs_outcome_check CHECK (outcome IN ('ok', 'failed', 'missed'))
);
CREATE INDEX runs_unfinished_idx ON scheduler.runs (fire_time) WHERE finished_at IS NULL;
