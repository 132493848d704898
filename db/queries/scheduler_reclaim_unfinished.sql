-- Runs a dead scheduler claimed and never finished, taken over by the new leader.
UPDATE scheduler.runs
SET scheduler = :scheduler, attempts = attempts + 1, claimed_at = now()
WHERE finished_at IS NULL
RETURNING job_id, fire_time
