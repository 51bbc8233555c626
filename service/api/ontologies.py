"""The RPCs of OntologyService: decode, call the domain, encode."""

from __future__ import annotations

from dataclasses import dataclass

from datasetd.v1 import ontology_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.pagination import PageTokens
from service.api.rpc import Context, decoded, mutation
from service.domain.idempotency import Idempotency
from service.domain.models import Principal
from service.domain.ontologies import OntologyService
from service.wire.ontologies import ontology_fields, ontology_to_proto


@dataclass(frozen=True)
class OntologyRpcs:
    ontologies: OntologyService
    idempotency: Idempotency
    tokens: PageTokens

    @mutation()
    async def CreateOntology(
        self, request: api.CreateOntologyRequest, principal: Principal
    ) -> api.CreateOntologyResponse:
        fields = decoded(lambda violations: ontology_fields(request.ontology, None, violations))
        created = await self.ontologies.create(
            principal, request.app_id, request.ontology.id, fields
        )
        return api.CreateOntologyResponse(ontology=ontology_to_proto(created))

    async def GetOntology(
        self, request: api.GetOntologyRequest, context: Context
    ) -> api.GetOntologyResponse:
        found = await self.ontologies.get(current_principal(), request.app_id, request.ontology_id)
        return api.GetOntologyResponse(ontology=ontology_to_proto(found))

    async def ListOntologies(
        self, request: api.ListOntologiesRequest, context: Context
    ) -> api.ListOntologiesResponse:
        page = self.tokens.page("ListOntologies", request)
        found, last = await self.ontologies.list(
            current_principal(), request.app_id, page.after, page.limit
        )
        return api.ListOntologiesResponse(
            ontologies=[ontology_to_proto(o) for o in found], next_page_token=page.next_token(last)
        )

    @mutation()
    async def UpdateOntology(
        self, request: api.UpdateOntologyRequest, principal: Principal
    ) -> api.UpdateOntologyResponse:
        paths = list(request.update_mask.paths)
        fields = decoded(lambda violations: ontology_fields(request.ontology, paths, violations))
        updated = await self.ontologies.update(
            principal, request.app_id, request.ontology.id, fields, request.expected_revision
        )
        return api.UpdateOntologyResponse(ontology=ontology_to_proto(updated))

    @mutation()
    async def DeleteOntology(
        self, request: api.DeleteOntologyRequest, principal: Principal
    ) -> api.DeleteOntologyResponse:
        await self.ontologies.delete(principal, request.app_id, request.ontology_id)
        return api.DeleteOntologyResponse()
