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

-- name: take_xid
-- Run inside a transaction that then commits: a transaction with an id writes a commit
-- record, and its COMMIT waits for the synchronous standbys like any write's (see
-- pg_commit.commit_status).
SELECT pg_current_xact_id();

-- name: create_campaign
-- With the campaign, its 16 redemption counter rows (see migration 0002).
WITH created AS (
INSERT INTO campaigns (
    id, name, total, start_time, end_time,
    discount_percent_off, discount_currency, discount_minor_units, metadata, brand
)
VALUES (
    %(id)s, %(name)s, %(total)s, COALESCE(%(start_time)s::timestamptz, now()), %(end_time)s,
    %(percent_off)s, %(currency)s, %(minor_units)s, %(metadata)s, %(brand)s
)
RETURNING id, start_time, created_at
), counters AS (
    INSERT INTO campaign_redemption_counts (campaign_id, shard)
    SELECT created.id, s.shard FROM created CROSS JOIN generate_series(0, 15) AS s(shard)
)
SELECT start_time, created_at FROM created;

-- name: take_many
-- The only way `issued` grows: by as many as the group wants and the campaign still has,
-- never past `total`, never before the start instant nor from the end instant on by the
-- DATABASE clock. FOR UPDATE takes
-- the campaign row lock until COMMIT (so positions follow commit order) and reads the latest
-- committed `issued`, which becomes `before`: this group's codes take positions
-- before+1 .. after.
WITH locked AS (
    SELECT id, issued AS before
    FROM campaigns
    WHERE id = %(campaign_id)s AND issued < total AND start_time <= now()
      AND (end_time IS NULL OR now() < end_time)
    FOR UPDATE
)
UPDATE campaigns c
SET issued = c.issued + LEAST(%(wanted)s, c.total - c.issued)
FROM locked
WHERE c.id = locked.id
RETURNING locked.before, c.issued, c.total, c.start_time, now(),
    c.end_time, c.discount_percent_off, c.discount_currency, c.discount_minor_units,
    -- The transaction's id, for resolving a COMMIT whose answer was lost (pg_commit.py).
    pg_current_xact_id()::text;

-- name: give_back
-- Positions taken for users who turned out to hold a code already; same transaction, so
-- nobody ever sees them taken.
UPDATE campaigns SET issued = issued - %(unused)s WHERE id = %(campaign_id)s;

-- name: held_codes
-- Earlier codes of the group's users and idempotency keys. Run while holding the campaign row
-- lock, so no other transaction can be storing a code for this campaign at the same time.
SELECT user_id, idempotency_key, code, issued_at
FROM coupons
WHERE campaign_id = %(campaign_id)s
  AND (user_id = ANY(%(user_ids)s) OR idempotency_key = ANY(%(keys)s));

-- name: insert_coupons
-- A code already taken (a collision, across all campaigns) inserts nothing for that row and
-- does not abort the transaction; the caller retries those positions with fresh codes.
INSERT INTO coupons (code, campaign_id, seq, user_id, idempotency_key, issued_at)
SELECT t.code, %(campaign_id)s, t.seq, t.user_id, t.idempotency_key, %(issued_at)s
FROM unnest(%(codes)s::text[], %(seqs)s::int[], %(user_ids)s::text[], %(keys)s::text[])
    AS t(code, seq, user_id, idempotency_key)
ON CONFLICT ON CONSTRAINT coupons_code_key DO NOTHING
RETURNING seq;

-- name: campaign_state
-- Why take_many matched nothing: no row (not found), not started, ended, or sold out.
SELECT total, start_time, start_time <= now() AS started,
    end_time IS NOT NULL AND now() >= end_time AS ended,
    end_time, discount_percent_off, discount_currency, discount_minor_units
FROM campaigns
WHERE id = %(campaign_id)s;

-- name: campaign_page
-- One statement, so the campaign counters and its page come from one snapshot. `brand` NULL:
-- every brand; another brand's campaign is not found.
SELECT c.name, c.total, c.issued, c.start_time, c.end_time,
    c.discount_percent_off, c.discount_currency, c.discount_minor_units,
    c.metadata, c.brand, c.created_at, r.redeemed, p.seq, p.code
FROM campaigns c
CROSS JOIN LATERAL (
    SELECT COALESCE(sum(redeemed), 0)::int AS redeemed FROM campaign_redemption_counts
    WHERE campaign_id = c.id
) r
LEFT JOIN LATERAL (
    SELECT seq, code FROM coupons
    WHERE campaign_id = c.id AND seq > %(after_seq)s
    ORDER BY seq
    LIMIT %(limit)s
) p ON true
WHERE c.id = %(campaign_id)s AND (%(brand)s::text IS NULL OR c.brand = %(brand)s)
ORDER BY p.seq;

-- The coupon's life after issuance (GetCoupon, RedeemCoupon, CancelRedemption) and the brand's
-- list. `brand` NULL means every brand; a code or campaign of another brand is not found.

-- name: list_campaigns
-- Newest first, keyset-paged after (created_at, id); the first page starts after
-- ('infinity', the greatest uuid). Counts are taken for the page's campaigns only.
SELECT c.id, c.name, c.total, c.issued, c.start_time, c.end_time,
    c.discount_percent_off, c.discount_currency, c.discount_minor_units,
    c.metadata, c.brand, c.created_at, r.redeemed
FROM (
    SELECT * FROM campaigns
    WHERE (created_at, id) < (%(after_created_at)s, %(after_id)s)
    ORDER BY created_at DESC, id DESC
    LIMIT %(limit)s
) c
CROSS JOIN LATERAL (
    SELECT COALESCE(sum(redeemed), 0)::int AS redeemed FROM campaign_redemption_counts
    WHERE campaign_id = c.id
) r
ORDER BY c.created_at DESC, c.id DESC;

-- name: list_brand_campaigns
-- list_campaigns for one brand (its own query so each uses its own index).
SELECT c.id, c.name, c.total, c.issued, c.start_time, c.end_time,
    c.discount_percent_off, c.discount_currency, c.discount_minor_units,
    c.metadata, c.brand, c.created_at, r.redeemed
FROM (
    SELECT * FROM campaigns
    WHERE brand = %(brand)s AND (created_at, id) < (%(after_created_at)s, %(after_id)s)
    ORDER BY created_at DESC, id DESC
    LIMIT %(limit)s
) c
CROSS JOIN LATERAL (
    SELECT COALESCE(sum(redeemed), 0)::int AS redeemed FROM campaign_redemption_counts
    WHERE campaign_id = c.id
) r
ORDER BY c.created_at DESC, c.id DESC;

-- name: get_coupon
-- The coupon as it is now; `ended` by the DATABASE clock. Also what explains a redemption
-- that matched nothing.
SELECT k.code, k.campaign_id, k.user_id, k.issued_at, k.order_id, k.redeemed_at,
    c.end_time, c.discount_percent_off, c.discount_currency, c.discount_minor_units,
    c.end_time IS NOT NULL AND now() >= c.end_time AS ended
FROM coupons k
JOIN campaigns c ON c.id = k.campaign_id
WHERE k.code = %(code)s AND (%(brand)s::text IS NULL OR c.brand = %(brand)s);

-- name: redeem_coupon
-- The only way a code becomes redeemed: one conditional UPDATE. Of racing orders, the first
-- takes the row lock; the others re-check `order_id IS NULL` on the committed row and match
-- nothing. The history row and the campaign's count change in the same statement (one
-- transaction).
WITH redeemed AS (
    UPDATE coupons k
    SET order_id = %(order_id)s, redeemed_at = now()
    FROM campaigns c
    WHERE k.code = %(code)s AND c.id = k.campaign_id
      AND k.order_id IS NULL
      AND (c.end_time IS NULL OR now() < c.end_time)
      AND (k.user_id IS NULL OR k.user_id = %(user_id)s)
      AND (%(brand)s::text IS NULL OR c.brand = %(brand)s)
    RETURNING k.code, k.campaign_id, k.seq, k.order_id, k.redeemed_at,
        c.discount_percent_off, c.discount_currency, c.discount_minor_units
), logged AS (
    INSERT INTO redemptions (code, order_id, action, at)
    SELECT code, order_id, 'redeem', redeemed_at FROM redeemed
), counted AS (
    UPDATE campaign_redemption_counts n SET redeemed = n.redeemed + 1
    FROM redeemed r
    WHERE n.campaign_id = r.campaign_id AND n.shard = r.seq %% 16
)
SELECT campaign_id, redeemed_at, discount_percent_off, discount_currency, discount_minor_units
FROM redeemed;

-- name: cancel_redemption
-- The holding order gives the code back, and the history and the count say so, in one
-- statement.
WITH cancelled AS (
    UPDATE coupons k
    SET order_id = NULL, redeemed_at = NULL
    FROM campaigns c
    WHERE k.code = %(code)s AND c.id = k.campaign_id
      AND k.order_id = %(order_id)s
      AND (%(brand)s::text IS NULL OR c.brand = %(brand)s)
    RETURNING k.code, k.campaign_id, k.user_id, k.issued_at, k.order_id, k.redeemed_at,
        c.end_time, c.discount_percent_off, c.discount_currency, c.discount_minor_units,
        c.end_time IS NOT NULL AND now() >= c.end_time AS ended, k.seq
), logged AS (
    INSERT INTO redemptions (code, order_id, action)
    SELECT code, %(order_id)s, 'cancel' FROM cancelled
), counted AS (
    UPDATE campaign_redemption_counts n SET redeemed = n.redeemed - 1
    FROM cancelled r
    WHERE n.campaign_id = r.campaign_id AND n.shard = r.seq %% 16
)
SELECT code, campaign_id, user_id, issued_at, order_id, redeemed_at, end_time,
    discount_percent_off, discount_currency, discount_minor_units, ended
FROM cancelled;

-- name: cancelled_by
-- Whether this order once redeemed the code and cancelled that (a repeated cancel succeeds).
SELECT EXISTS (
    SELECT 1 FROM redemptions
    WHERE code = %(code)s AND order_id = %(order_id)s AND action = 'cancel'
);
