-- Claim one fire time of a job; no row back means it is already claimed.
INSERT INTO scheduler.runs (job_id, fire_time, scheduler)
VALUES (:job_id, :fire_time, :scheduler)
ON CONFLICT (job_id, fire_time) DO NOTHING
RETURNING job_id
