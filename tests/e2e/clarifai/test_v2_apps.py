"""clarifai.api.V2 GetApp and PostApps: the key's app, nothing more."""

from __future__ import annotations

import asyncio

import pytest
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2

from service.app import Running
from service.storage.db import Database
from tests.conftest import Caller, new_caller

SUCCESS = status_code_pb2.SUCCESS
INVALID = status_code_pb2.CONN_INVALID_REQUEST


async def test_get_app_is_the_keys_app(
    v2: service_pb2_grpc.V2Stub, caller: Caller, db: Database
) -> None:
    mine = await v2.GetApp(
        service_pb2.GetAppRequest(
            user_app_id=resources_pb2.UserAppIDSet(user_id="me", app_id=caller.app_id)
        ),
        metadata=caller.metadata,
    )
    assert mine.status.code == SUCCESS, mine.status
    assert (mine.app.id, mine.app.user_id) == (caller.app_id, "me")
    implied = await v2.GetApp(service_pb2.GetAppRequest(), metadata=caller.metadata)
    assert implied.app.id == caller.app_id
    other = await new_caller(db)
    theirs = await v2.GetApp(
        service_pb2.GetAppRequest(
            user_app_id=resources_pb2.UserAppIDSet(user_id="me", app_id=other.app_id)
        ),
        metadata=caller.metadata,
    )
    assert theirs.status.code == status_code_pb2.CONN_KEY_INVALID, theirs.status


async def test_post_apps_accepts_only_the_keys_app(
    v2: service_pb2_grpc.V2Stub, caller: Caller
) -> None:
    workflow = resources_pb2.Workflow(id="Empty", app_id="main", user_id="clarifai")
    scope = resources_pb2.UserAppIDSet(user_id="someone")
    same = await v2.PostApps(
        service_pb2.PostAppsRequest(
            user_app_id=scope,
            apps=[resources_pb2.App(id=caller.app_id, default_workflow=workflow)],
        ),
        metadata=caller.metadata,
    )
    assert same.status.code == SUCCESS, same.status
    assert [(a.id, a.user_id) for a in same.apps] == [(caller.app_id, "someone")]
    refused = {
        "apps[0].id": resources_pb2.App(id="another-app", default_workflow=workflow),
        "apps[0].description": resources_pb2.App(id=caller.app_id, description="x"),
    }
    for field_name, app in refused.items():
        answer = await v2.PostApps(
            service_pb2.PostAppsRequest(user_app_id=scope, apps=[app]), metadata=caller.metadata
        )
        assert answer.status.code == INVALID, answer.status
        assert field_name in answer.status.details, answer.status
    # Still only the key's app.
    got = await v2.GetApp(service_pb2.GetAppRequest(), metadata=caller.metadata)
    assert got.app.id == caller.app_id
    refused_app = await v2.GetApp(
        service_pb2.GetAppRequest(
            user_app_id=resources_pb2.UserAppIDSet(user_id="me", app_id="another-app")
        ),
        metadata=caller.metadata,
    )
    assert refused_app.status.code == status_code_pb2.CONN_KEY_INVALID


async def test_the_sdk_gets_and_creates_the_keys_app(
    v2: service_pb2_grpc.V2Stub,
    server: Running,
    caller: Caller,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    home = tmp_path_factory.mktemp("home")

    def sdk() -> tuple[str, str]:
        # The SDK is synchronous and the server runs in this event loop: in a thread.
        from clarifai.client.user import User

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HOME", str(home))
            client = User(
                user_id="alice", pat=caller.key, base_url=f"http://127.0.0.1:{server.port}"
            )
            app = client.app(caller.app_id)
            made = client.create_app(caller.app_id)
            return app.app_info.id, made.id

    assert await asyncio.to_thread(sdk) == (caller.app_id, caller.app_id)
