-- Video re-encode jobs (ReencodeInputs): the inputs a job covers, in request order, and
-- what happened to each. State, progress and failure come from the job row itself.
CREATE TABLE reencode_jobs (
    app_id      text NOT NULL,
    job_id      bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    input_ids   text[] NOT NULL,
    -- input id -> {"outcome": "reencoded" | "failed", "details", "duration_seconds", "fps",
    -- "codec", "size", "sha256"}; inputs not reached yet have no entry.
    results     jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    modified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, job_id)
);
