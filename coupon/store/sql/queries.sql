-- Every query the Postgres store runs, by name. Blocks start with "-- name: <name>".
-- Parameters use psycopg's named placeholders.

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: lock_migrations
-- Several worker processes (or hosts) start at once: one applies, the others wait and then
-- find nothing left to do. Released with the transaction.
SELECT pg_advisory_xact_lock(%(lock_id)s);

-- name: applied_migrations
SELECT version FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: ping
SELECT 1;

-- name: create_campaign
INSERT INTO campaigns (id, name, total, start_time)
VALUES (%(id)s, %(name)s, %(total)s, COALESCE(%(start_time)s::timestamptz, now()))
RETURNING start_time;

-- name: take_one
-- The only way `issued` moves. The row lock it takes is held until COMMIT, which makes
-- seq order equal commit order. The database clock decides the start instant.
UPDATE campaigns
SET issued = issued + 1
WHERE id = %(campaign_id)s AND issued < total AND start_time <= now()
RETURNING issued, now();

-- name: insert_coupon
-- A clash on the code alone (a collision) inserts nothing and returns no row, so the caller
-- retries with a fresh code without aborting the transaction. A clash on the user raises.
INSERT INTO coupons (code, campaign_id, seq, user_id, issued_at)
VALUES (%(code)s, %(campaign_id)s, %(seq)s, %(user_id)s, %(issued_at)s)
ON CONFLICT ON CONSTRAINT coupons_code_key DO NOTHING
RETURNING seq;

-- name: probe_campaign
-- Why a call cannot take a code, in the memory store's order: no row (not found), not
-- started, or the user's earlier code. After a failed increment, none of these means sold out.
SELECT c.start_time, c.start_time <= now() AS started, cp.code, cp.issued_at
FROM campaigns c
LEFT JOIN coupons cp ON cp.campaign_id = c.id AND cp.user_id = %(user_id)s
WHERE c.id = %(campaign_id)s;

-- name: campaign_page
-- One statement, so the campaign counters and its page come from one snapshot.
SELECT c.name, c.total, c.issued, c.start_time, p.seq, p.code
FROM campaigns c
LEFT JOIN LATERAL (
    SELECT seq, code FROM coupons
    WHERE campaign_id = c.id AND seq > %(after_seq)s
    ORDER BY seq
    LIMIT %(limit)s
) p ON true
WHERE c.id = %(campaign_id)s
ORDER BY p.seq;
