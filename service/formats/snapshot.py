"""The serialized form of a version's inputs (its members' content): written when a
version is built, read by the export writers and by diffs.

A member's content is one serialized `datasetd.v1.Input`, laid out as the
Clarifai-Data-Protobuf format lays out an input (export-formats.md §1), so that archives are
these bytes batched together.

The input carries `id`, `title`, `created_at` and `data`; its status, modification time
and dataset memberships describe the live input rather than its content and are left
out. Into `data` go the media reference and info (`url` and `hosted`, as the domain chose
them), a text's content in `text.raw`, the input's metadata and geo point, and its
annotations folded in:

* concepts: the input's own first, then those of its other annotations in creation
  order, each concept id once (the first label of a concept wins);
* regions (boxes, polygons, points, keypoints, masks, spans) with their concepts in
  `region.data.concepts`, and video frames, in annotation order;
* an annotation's own metadata and `annotation_info` have no place in an Input and are
  not part of the version.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

from datasetd.v1 import data_pb2, input_pb2

from service.domain.models import EncodedInput, InputSnapshot, MediaType, VersionMetrics

# The mapping GetInput serves: a version shows an input the way the API does.
from service.wire.inputs import input_to_proto
from service.wire.struct import parse_stored

_Geometry = Literal["bounding_box", "polygon", "point", "mask"]
# Region geometry fields and the metric counting each.
_GEOMETRY_METRICS: tuple[tuple[_Geometry, str], ...] = (
    ("bounding_box", "bounding_boxes_count"),
    ("polygon", "polygons_count"),
    ("point", "points_count"),
    ("mask", "masks_count"),
)


def parse(data: bytes) -> input_pb2.Input:
    return input_pb2.Input.FromString(data)


class ProtobufSnapshotEncoder:
    """The domain's InputSnapshotEncoder."""

    def encode(self, snapshot: InputSnapshot) -> EncodedInput:
        message = fold(snapshot)
        # Deterministic, so that unchanged content hashes the same in every version.
        data = message.SerializeToString(deterministic=True)
        return EncodedInput(data, content_metrics(message.data))


def fold(snapshot: InputSnapshot) -> input_pb2.Input:
    """The input with its annotations folded into `data`."""
    message = input_to_proto(snapshot.view)
    for name in ("status", "modified_at", "dataset_ids"):
        message.ClearField(name)
    stored = snapshot.view.input
    data = message.data
    if stored.media_type is MediaType.TEXT and stored.text is not None:
        data.text.raw = stored.text
    labelled = {concept.id for concept in data.concepts}
    for annotation in snapshot.annotations:
        part = data_pb2.Data()
        parse_stored(annotation.data, part)
        for concept in part.concepts:
            if concept.id not in labelled:
                labelled.add(concept.id)
                data.concepts.append(concept)
        data.regions.extend(part.regions)
        data.frames.extend(part.frames)
    return message


def _positive(concepts: Iterable[data_pb2.Concept]) -> int:
    return sum(1 for concept in concepts if concept.value > 0)


def content_metrics(data: data_pb2.Data) -> VersionMetrics:
    """The metrics of one input's folded data.

    Regions are counted wherever they are, at the input's level and in video frames,
    and so are their positive concepts (region tags); frame tags are the concepts of
    frames themselves. A keypoint region counts as a region but not as a point, a span
    as a region only. An input is unlabeled when it has no concept (positive or
    negative), region or frame.
    """
    regions = list(all_regions(data))
    geometry = {
        metric: sum(1 for region in regions if region.region_info.HasField(field))
        for field, metric in _GEOMETRY_METRICS
    }
    return VersionMetrics(
        inputs_count=1,
        unlabeled_inputs_count=int(not (data.concepts or regions or data.frames)),
        inputs_with_metadata_count=int(bool(data.metadata.fields)),
        inputs_with_geo_count=int(data.HasField("geo")),
        regions_count=len(regions),
        frames_count=len(data.frames),
        embeddings_count=len(data.embeddings),
        positive_input_tags_count=_positive(data.concepts),
        positive_region_tags_count=sum(_positive(region.data.concepts) for region in regions),
        positive_frame_tags_count=sum(_positive(frame.data.concepts) for frame in data.frames),
        region_inputs_count=int(bool(regions)),
        region_frames_count=sum(1 for frame in data.frames if frame.data.regions),
        frame_inputs_count=int(bool(data.frames)),
        **geometry,
    )


def all_regions(data: data_pb2.Data) -> Iterator[data_pb2.Region]:
    """The input's regions, then those of its frames."""
    yield from data.regions
    for frame in data.frames:
        yield from frame.data.regions


def positive_concepts(message: input_pb2.Input) -> frozenset[str]:
    """Every concept the input is labelled with: its own, its regions' and its frames'. A
    concept with value 0 says the input is not that concept: it labels nothing."""
    data = message.data
    found = {c.id for c in data.concepts if c.value > 0}
    found.update(c.id for frame in data.frames for c in frame.data.concepts if c.value > 0)
    found.update(c.id for region in all_regions(data) for c in region.data.concepts if c.value > 0)
    return frozenset(found)


def labels_of(members_data: list[bytes]) -> list[frozenset[str]]:
    return [positive_concepts(parse(data)) for data in members_data]


class ProtobufContentConcepts:
    """The domain's ContentConcepts: the labels of a serialized `datasetd.v1.Input` are
    read the way the export writers read them (a concept with value 0 labels nothing)."""

    def concepts(self, data: bytes) -> frozenset[str]:
        return positive_concepts(parse(data))
