-- Exports of dataset versions: one archive per (version, format, options).

CREATE TABLE exports (
    app_id       text NOT NULL,
    dataset_id   text NOT NULL,
    version_id   text NOT NULL,
    id           text NOT NULL,
    seq          bigint GENERATED ALWAYS AS IDENTITY,
    format       text NOT NULL CHECK (format IN ('clarifai_data_protobuf', 'clarifai_data_json', 'coco')),
    options      jsonb NOT NULL DEFAULT '{}',
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'in_progress', 'succeeded', 'failed')),
    percent      integer NOT NULL DEFAULT 0,
    details      text NOT NULL DEFAULT '',
    -- The published archive; registered in blobs so the orphan collector
    -- removes it once the export (or its version) is gone.
    blob_key     text REFERENCES blobs (key),
    size         bigint NOT NULL DEFAULT 0,
    split_counts jsonb NOT NULL DEFAULT '{}',
    fidelity     jsonb NOT NULL DEFAULT '{}',
    job_id       bigint REFERENCES jobs (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    modified_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, dataset_id, version_id, id),
    FOREIGN KEY (app_id, dataset_id, version_id)
        REFERENCES dataset_versions (app_id, dataset_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX exports_order ON exports (app_id, dataset_id, version_id, seq);
CREATE INDEX exports_blob ON exports (blob_key) WHERE blob_key IS NOT NULL;
