-- Renew a claimed run; no row back means it is finished or another scheduler took it over.
UPDATE scheduler.runs
SET heartbeat_at = now()
WHERE job_id = :job_id AND fire_time = :fire_time AND scheduler = :scheduler
    AND finished_at IS NULL
RETURNING job_id
