-- The credit ledger. Amounts are whole credits (BIGINT), times are Unix milliseconds (BIGINT),
-- so the PostgreSQL and SQLite schemas hold exactly the same values.

CREATE TABLE accounts (
    id                TEXT PRIMARY KEY,
    email             TEXT,
    plan              TEXT NOT NULL,
    is_admin          BOOLEAN NOT NULL DEFAULT FALSE,
    -- Enterprise only: the negotiated monthly allowance. Other plans take it from the price list.
    monthly_allowance BIGINT CHECK (monthly_allowance > 0),
    api_key_hash      TEXT UNIQUE,
    cycle_anchor_ms   BIGINT NOT NULL,
    renewed_cycle_ms  BIGINT,
    next_renewal_ms   BIGINT,
    created_at_ms     BIGINT NOT NULL,
    -- Running totals, kept in step with grants and reservations in the same transaction.
    -- available = granted - held - committed - expired.
    granted           BIGINT NOT NULL DEFAULT 0 CHECK (granted >= 0),
    held              BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    committed         BIGINT NOT NULL DEFAULT 0 CHECK (committed >= 0),
    expired           BIGINT NOT NULL DEFAULT 0 CHECK (expired >= 0),
    journal_seq       BIGINT NOT NULL DEFAULT 0,
    CHECK (granted >= held + committed + expired)
);
CREATE INDEX accounts_next_renewal ON accounts (next_renewal_ms) WHERE next_renewal_ms IS NOT NULL;

CREATE TABLE grants (
    id             BIGSERIAL PRIMARY KEY,
    account_id     TEXT NOT NULL REFERENCES accounts (id),
    kind           TEXT NOT NULL CHECK (kind IN ('welcome', 'subscription', 'topup')),
    amount         BIGINT NOT NULL CHECK (amount > 0),
    remaining      BIGINT NOT NULL CHECK (remaining >= 0),
    expired        BIGINT NOT NULL DEFAULT 0 CHECK (expired >= 0),
    granted_at_ms  BIGINT NOT NULL,
    expires_at_ms  BIGINT,
    -- What created the grant, unique: welcome:<account>, sub:<account>:<cycle start>, topup:<payment ref>.
    source         TEXT NOT NULL UNIQUE,
    -- The request behind the source, to tell a replay from a conflicting reuse of the same source.
    fingerprint    TEXT NOT NULL,
    CHECK (remaining + expired <= amount)
);
-- Only what the hot paths read: an account's grants. Columns that reserves and commits change
-- (remaining, state, totals) are in no index, so those updates stay HOT on PostgreSQL.
CREATE INDEX grants_account ON grants (account_id);

CREATE TABLE reservations (
    id               BIGSERIAL PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts (id),
    idempotency_key  TEXT NOT NULL,
    operation        TEXT NOT NULL CHECK (operation IN ('reserve', 'charge')),
    action           TEXT NOT NULL,
    amount           BIGINT NOT NULL CHECK (amount >= 0),
    list_price       BIGINT NOT NULL CHECK (list_price >= 0),
    exempt           BOOLEAN NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released')),
    created_at_ms    BIGINT NOT NULL,
    resolved_at_ms   BIGINT,
    UNIQUE (account_id, idempotency_key)
);

-- Which grants a reservation drew from, in burn-down order.
CREATE TABLE reservation_parts (
    reservation_id BIGINT NOT NULL REFERENCES reservations (id),
    seq            INTEGER NOT NULL,
    grant_id       BIGINT NOT NULL REFERENCES grants (id),
    amount         BIGINT NOT NULL CHECK (amount > 0),
    PRIMARY KEY (reservation_id, seq)
);

-- Append-only: one row per change of an account's credits, numbered per account.
CREATE TABLE journal (
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    seq             BIGINT NOT NULL,
    at_ms           BIGINT NOT NULL,
    entry           TEXT NOT NULL CHECK (entry IN ('grant', 'reserve', 'commit', 'release', 'expire')),
    amount          BIGINT NOT NULL CHECK (amount >= 0),
    kind            TEXT,
    grant_id        BIGINT,
    reservation_id  BIGINT,
    action          TEXT,
    list_price      BIGINT,
    reference       TEXT,
    available_after BIGINT NOT NULL,
    held_after      BIGINT NOT NULL,
    PRIMARY KEY (account_id, seq)
);

CREATE FUNCTION journal_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the journal is append-only';
END $$;
CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH ROW EXECUTE FUNCTION journal_is_append_only();
