-- Ontologies: an app's label schemas. The class tree is one jsonb document (read and
-- replaced as a whole; never queried inside), the revision counts the changes.

CREATE TABLE ontologies (
    app_id                text NOT NULL,
    id                    text NOT NULL,
    seq                   bigint GENERATED ALWAYS AS IDENTITY,
    description           text NOT NULL DEFAULT '',
    classes               jsonb NOT NULL DEFAULT '[]',
    input_classifications jsonb NOT NULL DEFAULT '[]',
    revision              bigint NOT NULL DEFAULT 1,
    created_at            timestamptz NOT NULL DEFAULT now(),
    modified_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, id)
);
CREATE UNIQUE INDEX ontologies_order ON ontologies (app_id, seq);
