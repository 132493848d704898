SELECT to_regclass('scheduler.runs') IS NOT NULL AND to_regclass('scheduler.apscheduler_jobs') IS NOT NULL
