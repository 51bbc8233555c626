"""The RPCs of ProjectService: decode, call the domain, encode."""

from __future__ import annotations

from dataclasses import dataclass

from datasetd.v1 import project_service_pb2 as api

from service.api.interceptors import current_principal
from service.api.pagination import PageTokens, page_size
from service.api.rpc import Context, decoded, mutation
from service.domain.errors import InvalidArgument
from service.domain.idempotency import Idempotency
from service.domain.models import Principal
from service.domain.ontology_check import DatasetValidation, LocatedFinding, Rule
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

    async def ValidateDataset(
        self, request: api.ValidateDatasetRequest, context: Context
    ) -> api.ValidateDatasetResponse:
        limit = page_size(request.page_size)
        rule = (
            Rule(api.OntologyRule.Name(request.rule))
            if request.rule != api.ONTOLOGY_RULE_UNSPECIFIED
            else None
        )
        scope = {
            "method": "ValidateDataset",
            "app_id": request.app_id,
            "dataset_id": request.dataset_id,
            "rule": request.rule,
        }
        after = self._finding_cursor(request.page_token, scope, rule)
        found = await self.projects.validate(
            current_principal(), request.app_id, request.dataset_id, rule, after, limit
        )
        return _validation_to_proto(
            found,
            self.tokens.encode(scope, list(found.next_cursor)) if found.next_cursor else "",
        )

    def _finding_cursor(
        self, token: str, scope: dict[str, object], rule: Rule | None
    ) -> tuple[int, int] | None:
        if not token:
            return None
        if rule is None:
            raise InvalidArgument.field(
                "page_token",
                "pages continue the findings of one rule: set `rule` as in the request "
                "that returned the token",
                reason="INVALID_PAGE_TOKEN",
            )
        cursor = self.tokens.decode(token, dict(scope))
        if len(cursor) != 2 or not all(isinstance(v, int) for v in cursor):
            raise InvalidArgument.field(
                "page_token",
                "is malformed; pass next_page_token unchanged",
                reason="INVALID_PAGE_TOKEN",
            )
        return cursor[0], cursor[1]


def _finding_to_proto(located: LocatedFinding) -> api.OntologyFinding:
    finding = located.finding
    return api.OntologyFinding(
        annotation_id=located.annotation_id,
        input_id=located.input_id,
        rule=api.OntologyRule.Value(finding.rule.value),
        field=finding.field,
        message=finding.message,
    )


def _validation_to_proto(found: DatasetValidation, token: str) -> api.ValidateDatasetResponse:
    return api.ValidateDatasetResponse(
        ontology_id=found.ontology.id,
        ontology_revision=found.ontology.revision,
        annotations_checked=found.annotations_checked,
        annotations_invalid=found.annotations_invalid,
        rules=[
            api.OntologyRuleReport(
                rule=api.OntologyRule.Value(report.rule.value),
                annotations_count=report.annotations,
                findings_count=report.findings,
                findings=[_finding_to_proto(f) for f in report.page],
            )
            for report in found.reports
        ],
        next_page_token=token,
    )
