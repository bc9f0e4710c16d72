-- Holds for tool calls: credits checked (held) before an image or video tool runs and charged
-- when it does. Each hold owns exactly one reservation, created in the same transaction; the
-- hold's status and the reservation's state agree (kiln audit): held <-> held, captured <->
-- committed, voided or expired <-> released. A hold nobody resolves is expired by maintenance
-- once expires_at_ms has passed.

CREATE TABLE holds (
    id               TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts (id),
    idempotency_key  TEXT NOT NULL,
    action           TEXT NOT NULL,
    reservation_id   BIGINT NOT NULL UNIQUE REFERENCES reservations (id),
    status           TEXT NOT NULL CHECK (status IN ('held', 'captured', 'voided', 'expired')),
    created_at_ms    BIGINT NOT NULL,
    expires_at_ms    BIGINT NOT NULL,
    resolved_at_ms   BIGINT,
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX holds_open ON holds (expires_at_ms) WHERE status = 'held';
