"""Input messages <-> the domain's inputs: drafts from callers, stored inputs as the API
(and a version's content) shows them, and input filters as queries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from datasetd.v1 import common_pb2, data_pb2, input_pb2, status_pb2

from service.domain.input_drafts import DraftEmbedding, InputDraft
from service.domain.models import GeoPoint, InputQuery, InputView, MediaType
from service.wire.fast_json import message_json, struct_json
from service.wire.struct import parse_stored
from service.wire.timestamps import set_times

Medium = Literal["image", "video", "audio", "text"]
# The media fields of Data, named as MediaType values are.
MEDIA: tuple[Medium, ...] = ("image", "video", "audio", "text")
_CONCEPT_FIELDS = ("id", "name", "value")
_CONCEPT_KEYS = frozenset(_CONCEPT_FIELDS)
# The status of every input shown: only stored inputs are ever mapped to messages.
_STORED = status_pb2.Status(code=status_pb2.STATUS_CODE_INPUT_SUCCESS, description="Input stored")


def medium_of(data: data_pb2.Data) -> Medium | None:
    return next((medium for medium in MEDIA if data.HasField(medium)), None)


def concepts_to_json(concepts: Iterable[data_pb2.Concept]) -> list[dict[str, Any]]:
    """Caller-settable concept fields in the JSON form the domain keeps."""
    result = []
    for concept in concepts:
        as_dict = message_json(concept)
        result.append({k: v for k, v in as_dict.items() if k in _CONCEPT_FIELDS})
    return result


def input_draft(message: input_pb2.Input) -> InputDraft:
    data = message.data
    media = tuple(MediaType(name) for name in MEDIA if data.HasField(name))
    payload, url, text = b"", "", None
    if media:
        medium = getattr(data, media[0].value)
        url = medium.url
        if media[0] is MediaType.TEXT:
            text = medium.raw
        else:
            payload = medium.base64
    geo = None
    if data.HasField("geo") and data.geo.HasField("geo_point"):
        geo = GeoPoint(data.geo.geo_point.longitude, data.geo.geo_point.latitude)
    # The size a caller declares for a URL image (an empty image_info declares nothing).
    info = data.image.image_info
    image_size = (info.width, info.height) if info.width or info.height else None
    # The JSON form of Data(regions=..., frames=...), without copying them into one.
    annotation: dict[str, Any] = {}
    if data.regions:
        annotation["regions"] = [message_json(r) for r in data.regions]
    if data.frames:
        annotation["frames"] = [message_json(f) for f in data.frames]
    return InputDraft(
        id=message.id,
        media=media,
        data=payload,
        url=url,
        text=text,
        metadata=struct_json(data.metadata) if data.HasField("metadata") else None,
        concepts=concepts_to_json(data.concepts),
        geo=geo,
        title=message.title,
        dataset_ids=list(message.dataset_ids),
        annotation=annotation,
        embeddings=tuple(
            DraftEmbedding(e.model_id, tuple(e.vector), e.num_dimensions) for e in data.embeddings
        ),
        image_size=image_size,
    )


def input_to_proto(view: InputView) -> input_pb2.Input:
    stored = view.input
    message = input_pb2.Input(
        id=stored.id, title=stored.title, dataset_ids=stored.dataset_ids, status=_STORED
    )
    set_times(message, stored.created_at, stored.modified_at)
    data = message.data
    medium = getattr(data, stored.media_type.value)
    medium.SetInParent()
    medium.url = view.download_url
    if view.hosted is not None:
        medium.hosted.prefix, medium.hosted.suffix = view.hosted
        medium.hosted.sizes.append("orig")
    if stored.media_info:
        _set_media_info(data, stored.media_type, stored.media_info)
    for concept in stored.concepts:
        _add_concept(data, concept)
    if stored.metadata:
        data.metadata.update(stored.metadata)
    if stored.geo is not None:
        data.geo.geo_point.longitude = stored.geo.longitude
        data.geo.geo_point.latitude = stored.geo.latitude
    for given in view.embeddings:
        data.embeddings.add(
            model_id=given.model_id, vector=given.vector, num_dimensions=len(given.vector)
        )
    return message


def _add_concept(data: data_pb2.Data, concept: dict[str, Any]) -> None:
    """A stored concept into `data`: directly when it holds only the fields callers set
    (what CreateInputs stores), else through json_format (older rows, other fields)."""
    value = concept.get("value", 0.0)
    if concept.keys() <= _CONCEPT_KEYS and type(value) in (float, int):
        data.concepts.add(id=concept.get("id", ""), name=concept.get("name", ""), value=value)
    else:
        parse_stored(concept, data.concepts.add())


def _set_media_info(data: data_pb2.Data, media_type: MediaType, info: dict[str, Any]) -> None:
    """The probed facts of the stored original, in the info message of its medium."""
    if media_type is MediaType.IMAGE:
        data.image.image_info.width = info.get("width", 0)
        data.image.image_info.height = info.get("height", 0)
        data.image.image_info.format = info.get("format", "")
        data.image.image_info.color_mode = info.get("color_mode", "")
    elif media_type is MediaType.VIDEO:
        video = data.video.video_info
        video.width, video.height = info.get("width", 0), info.get("height", 0)
        video.fps, video.frame_count = info.get("fps", 0.0), info.get("frame_count", 0)
        video.video_format = info.get("format", "")
        video.duration_seconds = info.get("duration_seconds", 0.0)
    elif media_type is MediaType.AUDIO:
        audio = data.audio.audio_info
        audio.audio_format, audio.sample_rate = info.get("format", ""), info.get("sample_rate", 0)
        audio.duration_seconds = info.get("duration_seconds", 0.0)
        audio.bit_rate = info.get("bit_rate", 0)
    elif media_type is MediaType.TEXT:
        data.text.text_info.char_count = info.get("char_count", 0)
        data.text.text_info.encoding = info.get("encoding", "UTF-8")


def input_filter_query(
    app_id: str,
    message: common_pb2.InputFilter | None,
    *,
    ids: list[str] | None = None,
    dataset_id: str | None = None,
) -> InputQuery:
    if message is None:
        return InputQuery(app_id=app_id, ids=tuple(ids) if ids else None, dataset_id=dataset_id)
    states = {
        common_pb2.ANNOTATION_STATE_ANNOTATED: True,
        common_pb2.ANNOTATION_STATE_UNANNOTATED: False,
    }
    media_types = tuple(
        MediaType(common_pb2.MediaType.Name(m).removeprefix("MEDIA_TYPE_").lower())
        for m in message.media_types
        if m != common_pb2.MEDIA_TYPE_UNSPECIFIED
    )
    return InputQuery(
        app_id=app_id,
        ids=tuple(ids) if ids else None,
        dataset_id=dataset_id,
        media_types=media_types or None,
        metadata=struct_json(message.metadata) if message.HasField("metadata") else None,
        concept_ids=tuple(message.concept_ids) or None,
        negative_concept_ids=tuple(message.negative_concept_ids) or None,
        annotated=states.get(message.annotation_state),
    )
