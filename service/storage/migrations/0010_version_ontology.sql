-- Exports carry the ontology. Each class of an ontology has a category number (in its
-- jsonb, `category_id`) that stays its own; `last_category_id` is the highest number
-- ever given, so that a removed class's number is never given to another. Rows from
-- before carry no numbers: the service numbers their classes on read, in tree order.
ALTER TABLE ontologies ADD COLUMN last_category_id integer NOT NULL DEFAULT 0;

-- The ontology governing the dataset when a version's build completed (NULL when none
-- did): id and revision, read with the version, and apart from them the class trees and
-- highest category number that exports name categories and concepts from (read by
-- exports only, so that listing versions does not carry whole ontologies).
ALTER TABLE dataset_versions
    ADD COLUMN ontology_id text,
    ADD COLUMN ontology_revision bigint,
    ADD COLUMN ontology_classes jsonb;
