-- Snapshots by reference. Each input's content (the serialized Input with its annotations
-- folded in, formats/snapshot.py) is kept up to date in the transaction that changes the
-- input or its annotations, stored once per distinct content (content-addressed). A
-- version is then a list of (input id, content hash) references taken in the
-- CreateDatasetVersion transaction itself: an exact snapshot of that moment, READY at once,
-- and ten versions of a dataset share the content their inputs have in common.

CREATE TABLE input_contents (
    -- SHA-256 of `data`.
    hash        bytea PRIMARY KEY,
    data        bytea NOT NULL,
    -- What search filters a version's members by, derived from `data` (NULL until the
    -- maintenance loop's backfill has read content moved here from a version built before
    -- migration 0012 captured them).
    media_type  text,
    metadata    jsonb,
    concepts    text[],
    annotated   boolean,
    longitude   double precision,
    latitude    double precision,
    created_at  timestamptz,
    -- The content's VersionMetrics in their field order: a version's metrics are the sums
    -- over its references. NULL for content moved here from versions built before this
    -- migration (their versions keep the metrics they had).
    metrics     integer[]
);
CREATE INDEX input_contents_uncaptured ON input_contents (hash) WHERE media_type IS NULL;

-- NULL: the content is stale (a change since it was computed) or was never computed. The
-- transaction that makes it stale computes it before it commits; a version's creation
-- and the maintenance loop compute what any other path left stale.
ALTER TABLE inputs
    ADD COLUMN content_hash bytea,
    -- The top-level transaction that made the content stale: a transaction refreshes the
    -- inputs it changed, not those another transaction is about to refresh.
    ADD COLUMN stale_xid bigint;
CREATE INDEX inputs_stale ON inputs (stale_xid) WHERE content_hash IS NULL;
CREATE INDEX inputs_content ON inputs (content_hash) WHERE content_hash IS NOT NULL;

-- Any change to an input's row but the refresh itself (which sets a hash on a stale row)
-- makes its content stale.
CREATE FUNCTION inputs_content_stale() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.content_hash IS NULL AND NEW.content_hash IS NOT NULL THEN
        RETURN NEW;
    END IF;
    NEW.content_hash := NULL;
    NEW.stale_xid := pg_current_xact_id()::text::bigint;
    RETURN NEW;
END $$;
CREATE TRIGGER inputs_content_stale_insert BEFORE INSERT ON inputs
    FOR EACH ROW EXECUTE FUNCTION inputs_content_stale();
CREATE TRIGGER inputs_content_stale_update
    BEFORE UPDATE OF media_type, blob_key, source_url, text_raw, media_info, metadata,
                     longitude, latitude, title, created_at, content_hash
    ON inputs FOR EACH ROW EXECUTE FUNCTION inputs_content_stale();

-- A change to an input's annotations makes its content stale.
CREATE FUNCTION annotations_content_stale() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE inputs i SET content_hash = NULL
    FROM (SELECT DISTINCT app_id, input_id FROM changed) c
    WHERE i.app_id = c.app_id AND i.id = c.input_id
      AND (i.content_hash IS NOT NULL
           OR i.stale_xid IS DISTINCT FROM pg_current_xact_id()::text::bigint);
    RETURN NULL;
END $$;
CREATE TRIGGER annotations_content_stale_insert AFTER INSERT ON annotations
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION annotations_content_stale();
CREATE TRIGGER annotations_content_stale_update AFTER UPDATE ON annotations
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION annotations_content_stale();
CREATE TRIGGER annotations_content_stale_delete AFTER DELETE ON annotations
    REFERENCING OLD TABLE AS changed FOR EACH STATEMENT
    EXECUTE FUNCTION annotations_content_stale();

-- Content that may have lost its last reference: collected by the maintenance loop once
-- no input and no version refers to it.
CREATE TABLE content_candidates (hash bytea PRIMARY KEY);

CREATE FUNCTION inputs_content_replaced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO content_candidates (hash)
    SELECT DISTINCT o.content_hash FROM released o JOIN kept n ON n.app_id = o.app_id AND n.id = o.id
    WHERE o.content_hash IS NOT NULL AND o.content_hash IS DISTINCT FROM n.content_hash
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER inputs_content_replaced AFTER UPDATE ON inputs
    REFERENCING OLD TABLE AS released NEW TABLE AS kept FOR EACH STATEMENT
    EXECUTE FUNCTION inputs_content_replaced();

CREATE FUNCTION content_released() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO content_candidates (hash)
    SELECT DISTINCT content_hash FROM released WHERE content_hash IS NOT NULL
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER inputs_content_released AFTER DELETE ON inputs
    REFERENCING OLD TABLE AS released FOR EACH STATEMENT
    EXECUTE FUNCTION content_released();

-- The content each version held moves to input_contents (stored once), and each member
-- keeps its reference.
INSERT INTO input_contents (hash, data, media_type, metadata, concepts, annotated, longitude,
                            latitude, created_at)
SELECT DISTINCT ON (content_hash) content_hash, data, media_type, metadata, concepts, annotated,
       longitude, latitude, created_at
FROM version_inputs
WHERE data IS NOT NULL AND content_hash IS NOT NULL
ORDER BY content_hash
ON CONFLICT DO NOTHING;

DROP INDEX IF EXISTS version_inputs_uncaptured;
ALTER TABLE version_inputs
    DROP COLUMN data,
    DROP COLUMN media_type,
    DROP COLUMN metadata,
    DROP COLUMN concepts,
    DROP COLUMN annotated,
    DROP COLUMN longitude,
    DROP COLUMN latitude,
    DROP COLUMN created_at;
CREATE INDEX version_inputs_content ON version_inputs (content_hash);

-- A version's members go with it, as the foreign key's ON DELETE CASCADE did, but checked
-- once per statement rather than once per member: the key's check of every row inserted
-- cost about a second per 100,000 members of a version created (the version's row is
-- inserted, and locked, by the same transaction, so there is nothing to check).
ALTER TABLE version_inputs
    DROP CONSTRAINT version_inputs_app_id_dataset_id_version_id_fkey;
CREATE FUNCTION version_members_gone() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM version_inputs v USING gone g
    WHERE v.app_id = g.app_id AND v.dataset_id = g.dataset_id AND v.version_id = g.id;
    RETURN NULL;
END $$;
CREATE TRIGGER version_members_gone AFTER DELETE ON dataset_versions
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION version_members_gone();

CREATE TRIGGER version_inputs_content_released AFTER DELETE ON version_inputs
    REFERENCING OLD TABLE AS released FOR EACH STATEMENT
    EXECUTE FUNCTION content_released();

-- Versions still building when this migration runs are failed with a reason: their
-- members have no content, and the content they would have captured is gone by now.
-- (Builds no longer exist: a version is READY when CreateDatasetVersion returns.)
UPDATE dataset_versions
SET status = 'failed',
    details = 'the version was being built when datasetd was upgraded; create a new version'
WHERE status IN ('pending', 'in_progress');
