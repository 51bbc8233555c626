-- Projects: one ontology of the app and any number of its datasets. An ontology a
-- project uses cannot be deleted (the service refuses first, naming the projects);
-- deleting a project detaches its datasets; purging a dataset detaches it.

CREATE TABLE projects (
    app_id      text NOT NULL,
    id          text NOT NULL,
    seq         bigint GENERATED ALWAYS AS IDENTITY,
    description text NOT NULL DEFAULT '',
    ontology_id text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    modified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, id),
    FOREIGN KEY (app_id, ontology_id) REFERENCES ontologies (app_id, id)
);
CREATE UNIQUE INDEX projects_order ON projects (app_id, seq);
CREATE INDEX projects_by_ontology ON projects (app_id, ontology_id);

CREATE TABLE project_datasets (
    app_id     text NOT NULL,
    project_id text NOT NULL,
    dataset_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, project_id, dataset_id),
    FOREIGN KEY (app_id, project_id) REFERENCES projects (app_id, id) ON DELETE CASCADE,
    FOREIGN KEY (app_id, dataset_id) REFERENCES datasets (app_id, id) ON DELETE CASCADE
);
CREATE INDEX project_datasets_by_dataset ON project_datasets (app_id, dataset_id);
