-- The job table, the same on SQLite and PostgreSQL. $SEQ is the only dialect word: the auto-numbered key that keeps
-- jobs in the order they were accepted (SQLite: INTEGER PRIMARY KEY AUTOINCREMENT; PostgreSQL: an identity column).
-- Times are seconds since the epoch, from the database's clock. Statuses: queued, in_progress, completed, failed,
-- cancelled. A job in_progress holds a lease (owner, token, expiry); every update a worker makes names its token.
-- step/total: the denoising pass in progress; percent: the whole job (0-100); eta_at: when the worker expects the
-- denoising to end; segments: how many segments a `segments`-strategy job renders (NULL otherwise).
CREATE TABLE jobs (
    seq $SEQ,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    prompt TEXT NOT NULL,
    seed BIGINT NOT NULL,
    steps INTEGER NOT NULL,
    image_name TEXT NOT NULL,
    audio_name TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL,
    percent INTEGER NOT NULL DEFAULT 0,
    eta_at DOUBLE PRECISION,
    segments INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    checkpoint_step INTEGER,
    resumed_from_step INTEGER,
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires DOUBLE PRECISION,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    report TEXT
);
CREATE INDEX jobs_status_seq ON jobs (status, seq);
