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
-- The database clock too: this host's clock skew from it is learnt on every check.
SELECT now();

-- name: xact_status
-- committed / aborted / in progress (NULL: older than the wraparound horizon).
SELECT pg_xact_status(%(xid)s::xid8);

-- name: create_campaign
INSERT INTO campaigns (id, name, total, start_time)
VALUES (%(id)s, %(name)s, %(total)s, COALESCE(%(start_time)s::timestamptz, now()))
RETURNING start_time;

-- name: take_many
-- The only way `issued` grows: by as many as the group wants and the campaign still has,
-- never past `total`, never before the start instant by the DATABASE clock. FOR UPDATE takes
-- the campaign row lock until COMMIT (so positions follow commit order) and reads the latest
-- committed `issued`, which becomes `before`: this group's codes take positions
-- before+1 .. after.
WITH locked AS (
    SELECT id, issued AS before
    FROM campaigns
    WHERE id = %(campaign_id)s AND issued < total AND start_time <= now()
    FOR UPDATE
)
UPDATE campaigns c
SET issued = c.issued + LEAST(%(wanted)s, c.total - c.issued)
FROM locked
WHERE c.id = locked.id
RETURNING locked.before, c.issued, c.total, c.start_time, now(),
    -- The transaction's id, for resolving a COMMIT whose answer was lost (pg_commit.py).
    pg_current_xact_id()::text;

-- name: give_back
-- Positions taken for users who turned out to hold a code already; same transaction, so
-- nobody ever sees them taken.
UPDATE campaigns SET issued = issued - %(unused)s WHERE id = %(campaign_id)s;

-- name: held_codes
-- Earlier codes of the group's users. Run while holding the campaign row lock, so no other
-- transaction can be storing a code for this campaign at the same time.
SELECT user_id, code, issued_at
FROM coupons
WHERE campaign_id = %(campaign_id)s AND user_id = ANY(%(user_ids)s);

-- name: insert_coupons
-- A code already taken (a collision, across all campaigns) inserts nothing for that row and
-- does not abort the transaction; the caller retries those positions with fresh codes.
INSERT INTO coupons (code, campaign_id, seq, user_id, issued_at)
SELECT t.code, %(campaign_id)s, t.seq, t.user_id, %(issued_at)s
FROM unnest(%(codes)s::text[], %(seqs)s::int[], %(user_ids)s::text[]) AS t(code, seq, user_id)
ON CONFLICT ON CONSTRAINT coupons_code_key DO NOTHING
RETURNING seq;

-- name: campaign_state
-- Why take_many matched nothing: no row (not found), not started, or sold out.
SELECT total, start_time, start_time <= now() AS started
FROM campaigns
WHERE id = %(campaign_id)s;

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
