"""V2 concept RPCs: ListConcepts and GetConcept answer; PostConcepts and PatchConcepts
are refused.

datasetd keeps no concepts of their own: a concept exists in an app as the labels that
use it (input-level concepts and the concepts of regions and frames, all stored as
annotations). So ListConcepts/GetConcept read every annotation of the app and answer the
distinct concept ids, in the order first used, each with the name it was first given. A
concept posted or renamed on its own could not be kept (there is nowhere to keep it that
ListConcepts would show), so PostConcepts and PatchConcepts answer NOT_IMPLEMENTED saying
so, rather than SUCCESS for a change that would not happen: label inputs (`data.concepts`)
or annotations to make a concept exist."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from clarifai_grpc.grpc.api import resources_pb2, service_pb2
from datasetd.v1 import annotation_service_pb2 as api
from datasetd.v1 import data_pb2

from service.api.annotations import AnnotationRpcs
from service.api.clarifai import status
from service.api.clarifai.paging import page_request
from service.api.clarifai.parts import NativeParts
from service.api.clarifai.scope import app_of
from service.api.interceptors import Context
from service.domain.errors import InvalidArgument, NotFound
from service.observability import REQUEST_ID

_WALK_PAGE = 1000
_NO_CONCEPT_STORE = (
    "datasetd keeps concepts only as the labels that use them: label inputs "
    "(data.concepts) or annotations to make a concept exist (see the README: Clarifai "
    "compatibility)"
)


def _labels(data: data_pb2.Data) -> Iterable[data_pb2.Concept]:
    yield from data.concepts
    for region in data.regions:
        yield from region.data.concepts
    for frame in data.frames:
        yield from _labels(frame.data)


@dataclass
class ClarifaiConcepts:
    parts: NativeParts

    @property
    def native(self) -> AnnotationRpcs:
        return self.parts.annotations

    async def _concepts(self, app_id: str, context: Context | None) -> list[resources_pb2.Concept]:
        """The app's concepts, in the order first used."""
        seen: dict[str, resources_pb2.Concept] = {}
        token = ""
        while True:
            listed = await self.native.ListAnnotations(
                api.ListAnnotationsRequest(app_id=app_id, page_size=_WALK_PAGE, page_token=token),
                cast(Context, context),
            )
            for annotation in listed.annotations:
                for label in _labels(annotation.data):
                    if label.id not in seen:
                        seen[label.id] = resources_pb2.Concept(
                            id=label.id, name=label.name or label.id, value=1.0, app_id=app_id
                        )
            token = listed.next_page_token
            if not token:
                return list(seen.values())

    async def ListConcepts(
        self, request: service_pb2.ListConceptsRequest, context: Context | None
    ) -> service_pb2.MultiConceptResponse:
        app_id = app_of(request)
        page = page_request(request.page, request.per_page)
        concepts = await self._concepts(app_id, context)
        if request.id:
            # The deprecated `id` filter is a fuzzy match on the real API.
            wanted = request.id.lower()
            concepts = [c for c in concepts if wanted in c.id.lower() or wanted in c.name.lower()]
        start = (page.page - 1) * page.per_page
        return service_pb2.MultiConceptResponse(
            status=status.ok(REQUEST_ID.get()), concepts=concepts[start : start + page.per_page]
        )

    async def GetConcept(
        self, request: service_pb2.GetConceptRequest, context: Context | None
    ) -> service_pb2.SingleConceptResponse:
        app_id = app_of(request)
        if not request.concept_id:
            raise InvalidArgument.field("concept_id", "must name the concept")
        for concept in await self._concepts(app_id, context):
            if concept.id == request.concept_id:
                return service_pb2.SingleConceptResponse(
                    status=status.ok(REQUEST_ID.get()), concept=concept
                )
        raise NotFound.in_app("concept", app_id, request.concept_id)

    async def PostConcepts(
        self, request: service_pb2.PostConceptsRequest, context: Context | None
    ) -> service_pb2.MultiConceptResponse:
        app_of(request)
        return service_pb2.MultiConceptResponse(
            status=status.make(
                status.NOT_IMPLEMENTED,
                "Not supported by datasetd",
                f"PostConcepts: {_NO_CONCEPT_STORE}",
                REQUEST_ID.get(),
            )
        )

    async def PatchConcepts(
        self, request: service_pb2.PatchConceptsRequest, context: Context | None
    ) -> service_pb2.MultiConceptResponse:
        app_of(request)
        return service_pb2.MultiConceptResponse(
            status=status.make(
                status.NOT_IMPLEMENTED,
                "Not supported by datasetd",
                f"PatchConcepts: concepts cannot be renamed or changed on their own; "
                f"{_NO_CONCEPT_STORE}",
                REQUEST_ID.get(),
            )
        )
