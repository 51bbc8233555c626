-- Version diffs walk two versions side by side in input id order, a page at a time:
-- this index serves each page as an ordered range scan instead of a sort of the whole
-- version. Byte order ("C") so that the order is the same on every deployment.
CREATE UNIQUE INDEX version_inputs_by_input
    ON version_inputs (app_id, dataset_id, version_id, input_id COLLATE "C");
