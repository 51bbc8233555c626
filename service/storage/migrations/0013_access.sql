-- Issue 12 (access control). Users of an app, their roles on datasets, personal and
-- dataset-scoped keys, and the audit log.

CREATE TABLE users (
    app_id       text NOT NULL,
    id           text NOT NULL,
    display_name text NOT NULL DEFAULT '',
    role         text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    modified_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, id)
);
CREATE INDEX users_owners ON users (app_id) WHERE role = 'owner';

-- A purged dataset takes its collaborators with it; a soft-deleted one keeps them
-- (undelete restores access as it was).
CREATE TABLE collaborators (
    app_id      text NOT NULL,
    dataset_id  text NOT NULL,
    user_id     text NOT NULL,
    role        text NOT NULL CHECK (role IN ('viewer', 'admin')),
    added_by    text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    modified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, dataset_id, user_id),
    FOREIGN KEY (app_id, user_id) REFERENCES users (app_id, id) ON DELETE CASCADE,
    FOREIGN KEY (app_id, dataset_id) REFERENCES datasets (app_id, id) ON DELETE CASCADE
);
CREATE INDEX collaborators_user ON collaborators (app_id, user_id);

ALTER TABLE api_keys
    ADD COLUMN kind         text NOT NULL DEFAULT 'scoped' CHECK (kind IN ('personal', 'scoped')),
    ADD COLUMN user_id      text,
    ADD COLUMN dataset_ids  text[] NOT NULL DEFAULT '{}',
    ADD COLUMN created_by   text NOT NULL DEFAULT '',
    ADD COLUMN last_used_at timestamptz,
    ADD CONSTRAINT api_keys_personal_user CHECK ((kind = 'personal') = (user_id IS NOT NULL));
CREATE INDEX api_keys_newest ON api_keys (app_id, created_at DESC, id DESC);
CREATE INDEX api_keys_user ON api_keys (app_id, user_id) WHERE user_id IS NOT NULL;
CREATE INDEX api_keys_creator ON api_keys (app_id, created_by) WHERE created_by <> '';
CREATE INDEX api_keys_datasets ON api_keys USING gin (dataset_ids);

-- The bootstrap key of each existing app becomes the personal key of the app's first
-- owner; other existing keys stay app-wide scoped keys with the rights they had.
INSERT INTO users (app_id, id, display_name, role)
SELECT DISTINCT app_id, 'owner', 'App owner', 'owner' FROM api_keys WHERE description = 'bootstrap'
ON CONFLICT DO NOTHING;
UPDATE api_keys SET kind = 'personal', user_id = 'owner', scopes = ARRAY['read', 'write']
WHERE description = 'bootstrap';

CREATE TABLE audit_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    app_id       text NOT NULL,
    user_id      text NOT NULL DEFAULT '',
    key_id       text NOT NULL DEFAULT '',
    rpc          text NOT NULL,
    dataset_ids  text[] NOT NULL DEFAULT '{}',
    resource_ids text[] NOT NULL DEFAULT '{}',
    request_id   text NOT NULL DEFAULT '',
    outcome      text NOT NULL
);
-- Newest first within an app; the other filters ride on it or on their own index.
CREATE INDEX audit_events_app ON audit_events (app_id, id DESC);
CREATE INDEX audit_events_datasets ON audit_events USING gin (dataset_ids);
CREATE INDEX audit_events_user ON audit_events (app_id, user_id, id DESC);
CREATE INDEX audit_events_key ON audit_events (app_id, key_id, id DESC);
CREATE INDEX audit_events_outcome ON audit_events (app_id, outcome, id DESC);
-- The method's name (after the last '/'): ListAuditEvents' rpc filter, by full or bare name.
CREATE INDEX audit_events_method
    ON audit_events (app_id, regexp_replace(rpc, '^.*/', ''), id DESC);
CREATE INDEX audit_events_at ON audit_events (at);
