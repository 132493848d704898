-- A fire time past the misfire grace: recorded, not run. No row back: it had a row already.
INSERT INTO scheduler.runs (job_id, fire_time, scheduler, finished_at, outcome, detail)
VALUES (:job_id, :fire_time, :scheduler, now(), 'missed', :detail)
ON CONFLICT (job_id, fire_time) DO NOTHING
RETURNING job_id
