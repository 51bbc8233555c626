"""The Clarifai-Data-Protobuf and Clarifai-Data-JSON archives (export-formats.md §1, §2,
§5): what the writer writes and the reader checks."""

MIMETYPE_ENTRY = "mimetype"
PROTOBUF_MIMETYPE = "application/x.clarifai-data+protobuf"
JSON_MIMETYPE = "application/x.clarifai-data+json"
