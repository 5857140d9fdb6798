-- The webhook outbox's own SQL (procrastinate's tables; see coupon/webhooks/pg_outbox.py).

-- name: procrastinate_schema_version
-- NULL: procrastinate's schema is not installed yet. Otherwise the comment it was marked with.
SELECT CASE WHEN to_regclass('procrastinate_jobs') IS NULL THEN NULL
       ELSE COALESCE(obj_description(to_regclass('procrastinate_jobs'), 'pg_class'), '') END;

-- name: campaign_brand
SELECT brand FROM campaigns WHERE id = %(campaign_id)s;

-- name: history_written_now
-- The redemption history rows this transaction wrote for (code, order): their `at` is this
-- transaction's now(); a repeated RedeemCoupon or CancelRedemption writes none.
SELECT r.id, r.at, c.brand
FROM redemptions r
JOIN coupons k ON k.code = r.code
JOIN campaigns c ON c.id = k.campaign_id
WHERE r.code = %(code)s AND r.order_id = %(order_id)s AND r.at = now()
ORDER BY r.id;

-- name: issued_events
-- What a delivery job of coupon.issued events names: one group's codes, positions
-- first_seq..last_seq of the campaign (read by the coupons_campaign_seq_key index).
SELECT k.code, k.user_id, k.issued_at, c.brand
FROM coupons k
JOIN campaigns c ON c.id = k.campaign_id
WHERE k.campaign_id = %(campaign_id)s AND k.seq BETWEEN %(first_seq)s AND %(last_seq)s
ORDER BY k.seq;

-- name: history_events
-- What a delivery job of redemption events names: history rows by id.
SELECT r.id, r.action, r.at, r.code, r.order_id, k.campaign_id, k.user_id, c.brand
FROM redemptions r
JOIN coupons k ON k.code = r.code
JOIN campaigns c ON c.id = k.campaign_id
WHERE r.id = ANY(%(history_ids)s)
ORDER BY r.id;

-- name: take_dead_job
-- A dead-lettered batch leaves the failed state only by being queued again, in the same
-- transaction, as a fresh job with a fresh retry budget.
DELETE FROM procrastinate_jobs
WHERE id = %(job_id)s AND task_name = %(task_name)s AND status = 'failed'
RETURNING args;

-- name: mark_procrastinate_schema
-- {mark} is filled in with psycopg.sql.Literal (COMMENT takes no bound parameters).
COMMENT ON TABLE procrastinate_jobs IS {mark};
