-- Durable background jobs and dataset versions.

CREATE TABLE jobs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL,
    app_id      text NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}',
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts    integer NOT NULL DEFAULT 0,
    progress    integer NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    error       text NOT NULL DEFAULT '',
    -- Lease: a running job whose lease expired (its replica died) is taken over.
    locked_by   text,
    locked_until timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_runnable ON jobs (id) WHERE status IN ('pending', 'running');

CREATE TABLE dataset_versions (
    app_id      text NOT NULL,
    dataset_id  text NOT NULL,
    id          text NOT NULL,
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'in_progress', 'ready', 'failed')),
    percent     integer NOT NULL DEFAULT 0,
    details     text NOT NULL DEFAULT '',
    description text NOT NULL DEFAULT '',
    metadata    jsonb NOT NULL DEFAULT '{}',
    metrics     jsonb NOT NULL DEFAULT '{}',
    input_count integer NOT NULL DEFAULT 0,
    job_id      bigint REFERENCES jobs (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    modified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, dataset_id, id),
    FOREIGN KEY (app_id, dataset_id) REFERENCES datasets (app_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX dataset_versions_order ON dataset_versions (app_id, dataset_id, seq);

-- The members of a version, fixed when it is created; `data` is filled by the
-- build: the serialized Input (annotations folded into data), the version's content.
CREATE TABLE version_inputs (
    app_id       text NOT NULL,
    dataset_id   text NOT NULL,
    version_id   text NOT NULL,
    position     integer NOT NULL,
    input_id     text NOT NULL,
    data         bytea,
    -- SHA-256 of `data`: diffs compare versions without parsing them.
    content_hash bytea,
    -- The stored original, kept alive (not an orphan) while the version exists.
    blob_key     text REFERENCES blobs (key),
    PRIMARY KEY (app_id, dataset_id, version_id, position),
    FOREIGN KEY (app_id, dataset_id, version_id)
        REFERENCES dataset_versions (app_id, dataset_id, id) ON DELETE CASCADE
);
CREATE INDEX version_inputs_blob ON version_inputs (blob_key) WHERE blob_key IS NOT NULL;
