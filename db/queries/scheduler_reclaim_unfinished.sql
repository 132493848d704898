-- Runs another scheduler claimed, never finished and stopped renewing for longer than the
-- lease (it died): taken over by the leader. A run renewed within the lease is left to the
-- scheduler still inside it.
UPDATE scheduler.runs
SET scheduler = :scheduler, attempts = attempts + 1, claimed_at = now(), heartbeat_at = now()
WHERE finished_at IS NULL AND scheduler <> :scheduler
    AND heartbeat_at < now() - make_interval(secs => :lease_s)
RETURNING job_id, fire_time
