-- Issue 11 (search). Embedding models, the inputs' vectors (pgvector), embedding failures,
-- background add-by-search jobs, and what a version captured for searching it as it was.

CREATE EXTENSION IF NOT EXISTS vector;

-- A vector space. app_id '' holds the installation's models (built in, ONNX), seen by
-- every app; an app's client models are created by the first vector a caller gives.
-- `number` names the model in storage: its HNSW index is embeddings_hnsw_<number>, a
-- partial index over the rows of that model (pgvector indexes need one dimension).
CREATE TABLE embedding_models (
    number       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app_id       text NOT NULL,
    id           text NOT NULL,
    dimension    integer NOT NULL CHECK (dimension BETWEEN 1 AND 1536),
    media_types  text[] NOT NULL,
    accepts_text boolean NOT NULL DEFAULT false,
    source       text NOT NULL CHECK (source IN ('builtin', 'onnx', 'client')),
    description  text NOT NULL DEFAULT '',
    -- Installation models: changes when their vectors would (weights, preprocessing).
    fingerprint  text NOT NULL DEFAULT '',
    -- Installation models: false while no process of the installation is configured with
    -- it (ONNX model removed, built-ins switched off). Its vectors stay for the versions
    -- that captured them; it is neither listed, searched nor pending.
    active       boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (app_id, id)
);

-- One current vector per (input, model). A replaced vector (a newer one, or its input
-- deleted) keeps its row, with replaced_at set, while a version refers to it; the
-- maintenance loop deletes the others. No foreign key to inputs for that reason.
CREATE TABLE embeddings (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    app_id       text NOT NULL,
    input_id     text NOT NULL,
    model_number integer NOT NULL REFERENCES embedding_models (number) ON DELETE CASCADE,
    vector       vector NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    replaced_at  timestamptz
);
-- Inline, not TOASTed: exact scans read every vector (performance-notes.md: 6.5x).
ALTER TABLE embeddings ALTER COLUMN vector SET STORAGE PLAIN;
CREATE UNIQUE INDEX embeddings_current ON embeddings (app_id, input_id, model_number)
    WHERE replaced_at IS NULL;
CREATE INDEX embeddings_replaced ON embeddings (replaced_at) WHERE replaced_at IS NOT NULL;
-- The embedding job's look for inputs without a vector, from a seq on, across apps
-- (storage/embeddings.py: pending).
CREATE INDEX inputs_seq ON inputs (seq);

-- Inputs an installation model could not embed (undecodable media, ...): not retried
-- until the model changes or the input's media does.
CREATE TABLE embedding_failures (
    app_id       text NOT NULL,
    input_id     text NOT NULL,
    model_number integer NOT NULL REFERENCES embedding_models (number) ON DELETE CASCADE,
    error        text NOT NULL,
    failed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, input_id, model_number),
    FOREIGN KEY (app_id, input_id) REFERENCES inputs (app_id, id) ON DELETE CASCADE
);

-- A deleted input's vectors stop being current (versions may still refer to them).
CREATE FUNCTION embeddings_input_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE embeddings e SET replaced_at = now()
    FROM gone g
    WHERE e.app_id = g.app_id AND e.input_id = g.id AND e.replaced_at IS NULL;
    RETURN NULL;
END $$;
CREATE TRIGGER embeddings_input_deleted AFTER DELETE ON inputs
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION embeddings_input_deleted();

-- What a version captured of its members for search, beside their serialized content:
-- filled with the content by the build (and, for versions built before this migration,
-- by decoding that content once).
ALTER TABLE version_inputs
    ADD COLUMN input_seq  bigint,
    ADD COLUMN media_type text,
    ADD COLUMN metadata   jsonb,
    ADD COLUMN concepts   text[],
    ADD COLUMN annotated  boolean,
    ADD COLUMN longitude  double precision,
    ADD COLUMN latitude   double precision,
    ADD COLUMN created_at timestamptz;
-- Members of versions built before this migration, until the maintenance loop's backfill
-- has filled their columns (a build fills them with the content): empty afterwards.
CREATE INDEX version_inputs_uncaptured ON version_inputs (app_id)
    WHERE data IS NOT NULL AND media_type IS NULL;

-- The vectors a version captured: references, not copies.
CREATE TABLE version_embeddings (
    app_id       text NOT NULL,
    dataset_id   text NOT NULL,
    version_id   text NOT NULL,
    input_id     text NOT NULL,
    embedding_id bigint NOT NULL REFERENCES embeddings (id),
    PRIMARY KEY (app_id, dataset_id, version_id, embedding_id),
    FOREIGN KEY (app_id, dataset_id, version_id)
        REFERENCES dataset_versions (app_id, dataset_id, id) ON DELETE CASCADE
);
CREATE INDEX version_embeddings_by_embedding ON version_embeddings (embedding_id);

-- AddDatasetInputs by search with more matches than one call adds: the job's counts
-- (its state, progress and error are the jobs row's).
CREATE TABLE search_jobs (
    job_id        bigint PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    app_id        text NOT NULL,
    dataset_id    text NOT NULL,
    query         jsonb NOT NULL,
    matched_count bigint NOT NULL DEFAULT 0,
    added_count   bigint NOT NULL DEFAULT 0,
    present_count bigint NOT NULL DEFAULT 0,
    -- The seq of the last match the job added (it resumes after it, counts exact).
    last_seq      bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
