-- One row per run of a job (each claim): who ran it, when, how long its lease was kept
-- alive and how it ended. This is what shows that no job ran twice at the same time: the
-- runs of a job must follow one another, a run whose worker died (no finished_at) ending
-- at its lease_until, the last lease its heartbeats extended.
CREATE TABLE job_runs (
    id           bigserial PRIMARY KEY,
    job_id       bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind         text NOT NULL,
    worker_id    text NOT NULL,
    -- The job's attempt count this run was claimed with (a shutdown gives an attempt back,
    -- so two runs of a job may share a number).
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    lease_until  timestamptz NOT NULL,
    finished_at  timestamptz,
    -- succeeded, failed, cancelled; released (back to the queue: a retry, a shutdown, an
    -- outage); expired (its lease ran out and another claim took the job over; no
    -- finished_at: nobody saw it end). NULL while it runs.
    outcome      text CHECK (outcome IN
                     ('succeeded', 'failed', 'cancelled', 'released', 'expired'))
);
CREATE INDEX job_runs_job ON job_runs (job_id, started_at);

-- The run the lease holder is in: heartbeat, finish and release update it through the
-- job row they already update, matched by locked_by, so a stale runner cannot touch it.
ALTER TABLE jobs ADD COLUMN run_id bigint;
