-- The webhook outbox's own SQL (procrastinate's tables; see coupon/webhooks/pg_outbox.py).

-- name: procrastinate_schema_version
-- NULL: procrastinate's schema is not installed yet. Otherwise the comment it was marked with.
SELECT CASE WHEN to_regclass('procrastinate_jobs') IS NULL THEN NULL
       ELSE COALESCE(obj_description(to_regclass('procrastinate_jobs'), 'pg_class'), '') END;

-- name: campaign_brand
-- to_jsonb: NULL (no brand) on a schema from before the brand column (migration 0002).
SELECT to_jsonb(c) ->> 'brand' FROM campaigns c WHERE id = %(campaign_id)s;

-- name: take_dead_job
-- A dead-lettered batch leaves the failed state only by being queued again, in the same
-- transaction, as a fresh job with a fresh retry budget.
DELETE FROM procrastinate_jobs
WHERE id = %(job_id)s AND task_name = %(task_name)s AND status = 'failed'
RETURNING task_kwargs;

-- name: mark_procrastinate_schema
-- {mark} is filled in with psycopg.sql.Literal (COMMENT takes no bound parameters).
COMMENT ON TABLE procrastinate_jobs IS {mark};
