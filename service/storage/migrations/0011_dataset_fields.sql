-- Issue 15 (people coming from Datature Vi). Dataset fields: a display name, a lock
-- that refuses every mutation, a read-only flag that freezes the membership, a hidden
-- flag that keeps a dataset out of listings, and when the dataset was last read.
-- last_accessed_at is written by reads at most once a minute (see PgDatasetRepository.touch),
-- never by updates, so it neither moves modified_at nor the revision.

ALTER TABLE datasets
    ADD COLUMN display_name     text NOT NULL DEFAULT '',
    ADD COLUMN locked           boolean NOT NULL DEFAULT false,
    ADD COLUMN read_only        boolean NOT NULL DEFAULT false,
    ADD COLUMN hidden           boolean NOT NULL DEFAULT false,
    ADD COLUMN last_accessed_at timestamptz;

-- The Vi export formats (service/formats/vi).
ALTER TABLE exports DROP CONSTRAINT exports_format_check;
ALTER TABLE exports ADD CONSTRAINT exports_format_check
    CHECK (format IN ('clarifai_data_protobuf', 'clarifai_data_json', 'coco', 'vi_full', 'vi_jsonl'));
