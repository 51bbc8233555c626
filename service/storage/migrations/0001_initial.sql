-- Apps exist implicitly: an app is the namespace named by its API keys and rows.

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    app_id      text NOT NULL,
    lookup      text NOT NULL,           -- first bytes of the hash, to find candidates
    secret_hash bytea NOT NULL,          -- sha256 of the secret; the secret is never stored
    description text NOT NULL DEFAULT '',
    scopes      text[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX api_keys_lookup ON api_keys (lookup);
CREATE INDEX api_keys_app ON api_keys (app_id, description);

-- Every object in the store has a row; rows referencing blobs point here, and the
-- orphan collector deletes objects whose row nothing references.
CREATE TABLE blobs (
    key          text PRIMARY KEY,
    sha256       text NOT NULL,
    size         bigint NOT NULL CHECK (size >= 0),
    content_type text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blobs_last_seen ON blobs (last_seen);

CREATE TABLE datasets (
    app_id         text NOT NULL,
    id             text NOT NULL,
    description    text NOT NULL DEFAULT '',
    notes          text NOT NULL DEFAULT '',
    metadata       jsonb NOT NULL DEFAULT '{}',
    visibility     smallint NOT NULL DEFAULT 10,
    cover_url      text NOT NULL DEFAULT '',
    cover_blob     text REFERENCES blobs (key),
    cover_info     jsonb,
    default_filter jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    modified_at    timestamptz NOT NULL DEFAULT now(),
    revision       bigint NOT NULL DEFAULT 1,
    deleted_at     timestamptz,
    purge_after    timestamptz,
    PRIMARY KEY (app_id, id)
);
CREATE INDEX datasets_created ON datasets (app_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX datasets_modified ON datasets (app_id, modified_at, id) WHERE deleted_at IS NULL;
CREATE INDEX datasets_purge ON datasets (purge_after) WHERE deleted_at IS NOT NULL;
CREATE INDEX datasets_cover_blob ON datasets (cover_blob) WHERE cover_blob IS NOT NULL;

-- Remembered responses of mutations, keyed by the caller's request id.
CREATE TABLE idempotency (
    app_id      text NOT NULL,
    method      text NOT NULL,
    request_id  text NOT NULL,
    fingerprint bytea NOT NULL,
    response    bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, method, request_id)
);
CREATE INDEX idempotency_created ON idempotency (created_at);

-- Installation-wide secrets shared by every replica (e.g. the page-token key).
CREATE TABLE server_secrets (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);
