"""V2 GetApp, PostApps and GetUser, as far as datasetd has apps.

A datasetd app is the namespace a key belongs to; it is made with its first key (the CLI,
or the bootstrap secret), not through the API. So GetApp shows the key's app and PostApps
accepts only the key's own app (which exists: nothing to create). The user id is the one
the client names (Clarifai clients send `me` or theirs): datasetd has no users."""

from __future__ import annotations

from dataclasses import dataclass

from clarifai_grpc.grpc.api import resources_pb2, service_pb2

from service.api.clarifai import status
from service.api.clarifai.datasets import user_of
from service.api.clarifai.parts import NativeParts
from service.api.clarifai.scope import app_of
from service.api.interceptors import Context
from service.domain.errors import Violations
from service.observability import REQUEST_ID

# What the SDK's User.create_app always sends (a base workflow: datasetd has none, so it
# is ignored, as are the output-only fields).
_IGNORED_APP_FIELDS = frozenset({"id", "user_id", "default_workflow", "created_at", "modified_at"})


def app_out(app_id: str, user_id: str) -> resources_pb2.App:
    return resources_pb2.App(id=app_id, user_id=user_id)


@dataclass
class ClarifaiApps:
    parts: NativeParts

    async def GetApp(
        self, request: service_pb2.GetAppRequest, context: Context | None
    ) -> service_pb2.SingleAppResponse:
        return service_pb2.SingleAppResponse(
            status=status.ok(REQUEST_ID.get()), app=app_out(app_of(request), user_of(request))
        )

    async def GetUser(
        self, request: service_pb2.GetUserRequest, context: Context | None
    ) -> service_pb2.SingleUserResponse:
        """The user the client names (datasetd has no users of its own): what the SDK's
        `User(...)` needs to go on to `app()`; the key must still be valid."""
        app_of(request)
        user = resources_pb2.User(id=user_of(request))
        return service_pb2.SingleUserResponse(status=status.ok(REQUEST_ID.get()), user=user)

    async def PostApps(
        self, request: service_pb2.PostAppsRequest, context: Context | None
    ) -> service_pb2.MultiAppResponse:
        app_id = app_of(request)
        violations = Violations()
        if not request.apps:
            violations.add("apps", "must name one app: the key's own")
        for index, app in enumerate(request.apps):
            if app.id and app.id != app_id:
                violations.add(
                    f"apps[{index}].id",
                    f"datasetd apps are made with their API keys, not by PostApps; this "
                    f"key's app is {app_id!r}, got {app.id!r}",
                )
            for descriptor, _ in app.ListFields():
                if descriptor.name not in _IGNORED_APP_FIELDS:
                    violations.add(
                        f"apps[{index}].{descriptor.name}",
                        "is not supported by datasetd (an app has no settings)",
                    )
        violations.raise_if_any()
        answer = status.ok(REQUEST_ID.get())
        answer.details = f"app {app_id!r} exists (the key's app): nothing was created"
        user = user_of(request)
        return service_pb2.MultiAppResponse(
            status=answer, apps=[app_out(app_id, user) for _ in request.apps]
        )
