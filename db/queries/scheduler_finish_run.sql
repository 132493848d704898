UPDATE scheduler.runs
SET finished_at = now(), outcome = :outcome, detail = :detail
WHERE job_id = :job_id AND fire_time = :fire_time AND finished_at IS NULL
