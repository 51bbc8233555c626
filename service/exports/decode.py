"""Version member content as the domain's diffs read it."""

from __future__ import annotations

from service.exports.content import parse, positive_concepts


class ProtobufContentConcepts:
    """The domain's ContentConcepts: the labels of a serialized `datasetd.v1.Input` are
    read the way the export writers read them (a concept with value 0 labels nothing)."""

    def concepts(self, data: bytes) -> frozenset[str]:
        return positive_concepts(parse(data))
