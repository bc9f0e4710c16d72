-- Kit jobs: the record users poll. The apalis task table is only the execution engine (and is
-- pruned); this table keeps the history. Every job holds exactly one reservation, created in the
-- same transaction; the job's terminal status and the reservation's state agree (kiln audit).

CREATE TABLE kit_jobs (
    id               TEXT PRIMARY KEY,
    account_id       TEXT NOT NULL REFERENCES accounts (id),
    idempotency_key  TEXT NOT NULL,
    kit              TEXT NOT NULL CHECK (kit IN ('essentials', 'caratzon')),
    status           TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    reservation_id   BIGINT NOT NULL UNIQUE REFERENCES reservations (id),
    upload_key       TEXT NOT NULL,
    spec             TEXT NOT NULL,
    cost             BIGINT NOT NULL CHECK (cost >= 0),
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL CHECK (max_attempts > 0),
    -- Fencing token: bumped by every claim; only the holder of the current value may record
    -- progress or finish the job.
    fence            BIGINT NOT NULL DEFAULT 0,
    worker           TEXT,
    -- The apalis task that will run (or runs) the job now; replaced on each kiln retry.
    task_id          TEXT NOT NULL,
    step             TEXT,
    steps_done       INTEGER NOT NULL DEFAULT 0,
    steps_total      INTEGER NOT NULL DEFAULT 0,
    run_at_ms        BIGINT NOT NULL,
    created_at_ms    BIGINT NOT NULL,
    started_at_ms    BIGINT,
    finished_at_ms   BIGINT,
    updated_at_ms    BIGINT NOT NULL,
    error_code       TEXT,
    error_message    TEXT,
    manifest_key     TEXT,
    UNIQUE (account_id, idempotency_key)
);
CREATE INDEX kit_jobs_account ON kit_jobs (account_id, created_at_ms);
CREATE INDEX kit_jobs_open ON kit_jobs (status, created_at_ms) WHERE status IN ('queued', 'running');
