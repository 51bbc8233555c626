-- Inputs, dataset membership and annotations.

CREATE TABLE inputs (
    app_id      text NOT NULL,
    id          text NOT NULL,
    -- Insertion order: keyset pagination that stays stable under inserts.
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    media_type  text NOT NULL CHECK (media_type IN ('image', 'video', 'audio', 'text')),
    blob_key    text REFERENCES blobs (key),
    source_url  text NOT NULL DEFAULT '',
    text_raw    text,
    media_info  jsonb NOT NULL DEFAULT '{}',
    metadata    jsonb NOT NULL DEFAULT '{}',
    longitude   double precision,
    latitude    double precision,
    title       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    modified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, id)
);
CREATE UNIQUE INDEX inputs_order ON inputs (app_id, seq);
CREATE INDEX inputs_metadata ON inputs USING gin (metadata jsonb_path_ops);
CREATE INDEX inputs_blob ON inputs (blob_key) WHERE blob_key IS NOT NULL;

CREATE TABLE dataset_inputs (
    app_id     text NOT NULL,
    dataset_id text NOT NULL,
    input_id   text NOT NULL,
    seq        bigint GENERATED ALWAYS AS IDENTITY,
    added_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, dataset_id, input_id),
    FOREIGN KEY (app_id, dataset_id) REFERENCES datasets (app_id, id) ON DELETE CASCADE,
    FOREIGN KEY (app_id, input_id) REFERENCES inputs (app_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX dataset_inputs_order ON dataset_inputs (app_id, dataset_id, seq);
CREATE INDEX dataset_inputs_input ON dataset_inputs (app_id, input_id);

CREATE TABLE annotations (
    app_id            text NOT NULL,
    id                text NOT NULL,
    input_id          text NOT NULL,
    seq               bigint GENERATED ALWAYS AS IDENTITY,
    -- The annotation that carries an input's input-level concepts (one per input).
    input_level       boolean NOT NULL DEFAULT false,
    data              jsonb NOT NULL,
    annotation_info   jsonb NOT NULL DEFAULT '{}',
    -- Derived from data, for filters and statistics.
    positive_concepts text[] NOT NULL DEFAULT '{}',
    region_counts     jsonb NOT NULL DEFAULT '{}',
    frame_count       integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    modified_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, id),
    FOREIGN KEY (app_id, input_id) REFERENCES inputs (app_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX annotations_order ON annotations (app_id, seq);
CREATE INDEX annotations_input ON annotations (app_id, input_id, seq);
CREATE UNIQUE INDEX annotations_input_level ON annotations (app_id, input_id) WHERE input_level;
CREATE INDEX annotations_concepts ON annotations USING gin (positive_concepts);
