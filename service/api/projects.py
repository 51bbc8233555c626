"""The RPCs of ProjectService: decode, call the domain, encode."""

from __future__ import annotations

from dataclasses import dataclass

from datasetd.v1 import project_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.pagination import PageTokens
from service.api.rpc import Context, decoded, mutation
from service.domain.idempotency import Idempotency
from service.domain.models import Principal
from service.domain.projects import ProjectService
from service.wire.projects import project_fields, project_to_proto


@dataclass(frozen=True)
class ProjectRpcs:
    projects: ProjectService
    idempotency: Idempotency
    tokens: PageTokens

    @mutation()
    async def CreateProject(
        self, request: api.CreateProjectRequest, principal: Principal
    ) -> api.CreateProjectResponse:
        fields = decoded(lambda violations: project_fields(request.project, None, violations))
        created = await self.projects.create(principal, request.app_id, request.project.id, fields)
        return api.CreateProjectResponse(project=project_to_proto(created))

    async def GetProject(
        self, request: api.GetProjectRequest, context: Context
    ) -> api.GetProjectResponse:
        found = await self.projects.get(current_principal(), request.app_id, request.project_id)
        return api.GetProjectResponse(project=project_to_proto(found))

    async def ListProjects(
        self, request: api.ListProjectsRequest, context: Context
    ) -> api.ListProjectsResponse:
        page = self.tokens.page("ListProjects", request)
        found, last = await self.projects.list(
            current_principal(), request.app_id, page.after, page.limit
        )
        return api.ListProjectsResponse(
            projects=[project_to_proto(p) for p in found], next_page_token=page.next_token(last)
        )

    @mutation()
    async def UpdateProject(
        self, request: api.UpdateProjectRequest, principal: Principal
    ) -> api.UpdateProjectResponse:
        paths = list(request.update_mask.paths)
        fields = decoded(lambda violations: project_fields(request.project, paths, violations))
        updated = await self.projects.update(principal, request.app_id, request.project.id, fields)
        return api.UpdateProjectResponse(project=project_to_proto(updated))

    @mutation()
    async def DeleteProject(
        self, request: api.DeleteProjectRequest, principal: Principal
    ) -> api.DeleteProjectResponse:
        await self.projects.delete(principal, request.app_id, request.project_id)
        return api.DeleteProjectResponse()

    @mutation()
    async def AttachDataset(
        self, request: api.AttachDatasetRequest, principal: Principal
    ) -> api.AttachDatasetResponse:
        project = await self.projects.attach(
            principal, request.app_id, request.project_id, request.dataset_id
        )
        return api.AttachDatasetResponse(project=project_to_proto(project))

    @mutation()
    async def DetachDataset(
        self, request: api.DetachDatasetRequest, principal: Principal
    ) -> api.DetachDatasetResponse:
        project = await self.projects.detach(
            principal, request.app_id, request.project_id, request.dataset_id
        )
        return api.DetachDatasetResponse(project=project_to_proto(project))
