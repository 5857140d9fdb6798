-- Campaigns and their coupons. Released migrations are never edited: add a new file instead.

CREATE TABLE campaigns (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL,
    total       integer     NOT NULL CHECK (total > 0),
    issued      integer     NOT NULL DEFAULT 0,
    start_time  timestamptz NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Exactly N: the conditional increment can never push issued past total.
    CONSTRAINT campaigns_issued_range CHECK (issued BETWEEN 0 AND total)
);

CREATE TABLE coupons (
    -- Unique across ALL campaigns, not per campaign.
    code         text        NOT NULL CONSTRAINT coupons_code_key UNIQUE,
    campaign_id  uuid        NOT NULL REFERENCES campaigns (id),
    -- Position in issue order (1..total): the campaign's `issued` right after the increment,
    -- so it is gap-free and follows commit order (the increment holds the row lock).
    seq          integer     NOT NULL CHECK (seq > 0),
    user_id      text,
    issued_at    timestamptz NOT NULL,
    -- Also the index behind keyset paging: WHERE campaign_id = $1 AND seq > $2 ORDER BY seq.
    CONSTRAINT coupons_campaign_seq_key UNIQUE (campaign_id, seq)
);

-- At most one coupon per user per campaign; anonymous calls (NULL user) are not limited.
CREATE UNIQUE INDEX coupons_campaign_user_key
    ON coupons (campaign_id, user_id)
    WHERE user_id IS NOT NULL;
