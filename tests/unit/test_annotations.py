"""Pure helpers of the annotation use cases."""

from __future__ import annotations

import copy
from typing import Any

from service.domain.annotation_fields import MediaContext
from service.domain.annotations import media_context, with_generated_ids
from service.domain.models import AnnotatedMedia, MediaType


def test_generated_ids_fill_only_missing_ones_and_leave_the_input_alone() -> None:
    data: dict[str, Any] = {
        "concepts": [{"id": "cat"}],
        "regions": [{"id": "kept", "region_info": {}}, {"region_info": {}}],
        "frames": [
            {"frame_info": {}, "data": {"regions": [{"region_info": {}}]}},
            {"id": "f", "frame_info": {}},
        ],
    }
    original = copy.deepcopy(data)
    result = with_generated_ids(data)
    assert data == original
    assert result["concepts"] == [{"id": "cat"}]
    assert result["regions"][0]["id"] == "kept"
    assert len(result["regions"][1]["id"]) == 32
    assert len(result["frames"][0]["id"]) == 32
    assert len(result["frames"][0]["data"]["regions"][0]["id"]) == 32
    assert result["frames"][1] == {"id": "f", "frame_info": {}}


def test_media_context_treats_zero_as_unknown_except_for_text() -> None:
    video = AnnotatedMedia(
        MediaType.VIDEO, {"frame_count": 50, "duration_seconds": 2.0004, "fps": 25.0}
    )
    assert media_context(video) == MediaContext("video", None, 50, 2001)
    unprobed = AnnotatedMedia(MediaType.VIDEO, {"frame_count": 0, "duration_seconds": 0.0})
    assert media_context(unprobed) == MediaContext("video")
    assert media_context(AnnotatedMedia(MediaType.TEXT, {"char_count": 0})) == MediaContext(
        "text", text_length=0
    )
    audio = AnnotatedMedia(MediaType.AUDIO, {"duration_seconds": 1.5})
    assert media_context(audio) == MediaContext("audio", duration_ms=1500)
    assert media_context(AnnotatedMedia(MediaType.IMAGE, {"width": 4})) == MediaContext("image")
