-- v2: the coupon's life after issuance (end time, discount, metadata, brand, idempotency keys,
-- redemption and its append-only history). Released migrations are never edited.
--
-- Every column added here is NULL or has a constant default, so PostgreSQL adds it without
-- rewriting the table; the CHECK constraints and the new indexes read each table once.

ALTER TABLE campaigns
    ADD COLUMN end_time timestamptz,  -- NULL: never ends
    -- The discount as typed columns, so the database itself refuses a malformed one:
    -- a percentage, or an amount in minor units of an ISO 4217 currency, or neither.
    ADD COLUMN discount_percent_off  smallint CHECK (discount_percent_off BETWEEN 1 AND 100),
    ADD COLUMN discount_currency     text     CHECK (discount_currency ~ '^[A-Z]{3}$'),
    ADD COLUMN discount_minor_units  bigint   CHECK (discount_minor_units > 0),
    ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    ADD COLUMN brand text NOT NULL DEFAULT '',  -- '': no brand
    ADD CONSTRAINT campaigns_end_after_start CHECK (end_time > start_time),
    ADD CONSTRAINT campaigns_discount_one_kind CHECK (
        (discount_currency IS NULL) = (discount_minor_units IS NULL)
        AND NOT (discount_percent_off IS NOT NULL AND discount_currency IS NOT NULL)
    );

-- ListCampaigns: newest first, keyset-paged, for one brand or for all.
CREATE INDEX campaigns_brand_newest ON campaigns (brand, created_at DESC, id DESC);
CREATE INDEX campaigns_newest ON campaigns (created_at DESC, id DESC);

ALTER TABLE coupons
    ADD COLUMN idempotency_key text,
    ADD COLUMN order_id text,  -- the order that holds the code now; NULL: not redeemed
    ADD COLUMN redeemed_at timestamptz,
    ADD CONSTRAINT coupons_redeemed_pair CHECK ((order_id IS NULL) = (redeemed_at IS NULL));

-- A retry with the same key finds the first answer's code (per campaign).
CREATE UNIQUE INDEX coupons_campaign_idempotency_key
    ON coupons (campaign_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- redeemed_count without a counter: a counter on `campaigns` would make every RedeemCoupon
-- take the row lock that issuance holds for its whole transaction, and a counter row of its
-- own would serialize the campaign's redemptions. Counting this partial index touches only
-- the redeemed codes of one campaign (docs/postgres.md has the measurement).
CREATE INDEX coupons_redeemed ON coupons (campaign_id) WHERE order_id IS NOT NULL;

-- The audit trail: every redemption and cancellation, in order; rows are only ever added.
CREATE TABLE redemptions (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code      text        NOT NULL REFERENCES coupons (code),
    order_id  text        NOT NULL,
    action    text        NOT NULL CHECK (action IN ('redeem', 'cancel')),
    at        timestamptz NOT NULL DEFAULT now()
);

-- "Did this order cancel its redemption of this code?" (a repeated CancelRedemption), and the
-- history of one code in order.
CREATE INDEX redemptions_code_order ON redemptions (code, order_id, action);

CREATE FUNCTION redemptions_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'redemptions is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER redemptions_no_update_delete
    BEFORE UPDATE OR DELETE ON redemptions
    FOR EACH ROW EXECUTE FUNCTION redemptions_append_only();

CREATE TRIGGER redemptions_no_truncate
    BEFORE TRUNCATE ON redemptions
    FOR EACH STATEMENT EXECUTE FUNCTION redemptions_append_only();
