-- A claimed run is renewed by its scheduler while the job runs. An unfinished row whose
-- heartbeat is older than the lease belongs to a scheduler that is gone and is run again by
-- the leader; one whose heartbeat is fresh is still running somewhere (a leader that lost
-- its lock finishes the job it is inside) and is left to it.
ALTER TABLE scheduler.runs ADD COLUMN heartbeat_at timestamptz NOT NULL DEFAULT now();
