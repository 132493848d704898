-- Record a run's outcome; no row back means another scheduler took it over (this one had
-- stopped renewing its claim): the outcome is that one's to record.
UPDATE scheduler.runs
SET finished_at = now(), outcome = :outcome, detail = :detail
WHERE job_id = :job_id AND fire_time = :fire_time AND scheduler = :scheduler
    AND finished_at IS NULL
RETURNING job_id
