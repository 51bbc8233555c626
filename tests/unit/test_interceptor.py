"""The interceptor turns any unexpected exception into INTERNAL with a logged request id."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import grpc
import pytest
from datasetd.v1 import input_pb2, input_service_pb2

from service.api.access_policy import Policy, Rule
from service.api.interceptors import PRINCIPAL, Call, RequestInterceptor, current_principal
from service.domain.access import Action, Resource
from service.domain.auth import Authenticator, new_key
from service.domain.errors import NotFound, PermissionDenied
from service.domain.models import ApiKey, DatasetRole, Principal
from service.domain.ports import ApiKeyRepository, CollaboratorRepository, UserRepository
from tests.helpers import details_of
from tests.unit.test_auth import FakeKeys, FixedClock

METHOD = "/test.Echo/Call"
# The test methods' rules: any authenticated caller (their handlers decide nothing; no
# app field: the key's app, as in Clarifai's V2).
POLICY = Policy(
    {
        METHOD: Rule(Action.READ, Resource.APP, domain=True, app_field=""),
        "/test.Typed/Call": Rule(Action.READ, Resource.APP, domain=True, app_field=""),
    }
)


def _identity(data: bytes) -> bytes:
    return data


async def _behaviour(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"boom":
        raise RuntimeError("secret internal detail")
    if request == b"missing":
        raise NotFound("no such thing", reason="THING_NOT_FOUND")
    return current_principal().app_id.encode()


class _Keys(FakeKeys):
    async def touch(self, key_id: str, at: datetime) -> None:
        pass


class _NoUsers:
    async def get(self, app_id: str, user_id: str) -> None:
        return None


class _NoCollaborators:
    async def roles_of(self, app_id: str, user_id: str) -> dict[str, DatasetRole]:
        return {}


def _authenticator() -> tuple[Authenticator, str]:
    """An Authenticator knowing one app-wide key of "app" (scoped keys need no users)."""
    keys = _Keys()
    secret, key = new_key("app", "k")
    keys.keys.append(key)
    return (
        Authenticator(
            cast(ApiKeyRepository, keys),
            FixedClock(),
            users=cast(UserRepository, _NoUsers()),
            collaborators=cast(CollaboratorRepository, _NoCollaborators()),
        ),
        secret,
    )


@pytest.fixture
async def echo() -> AsyncIterator[tuple[grpc.aio.Channel, str]]:
    authenticator, secret = _authenticator()
    server = grpc.aio.server(interceptors=[RequestInterceptor(authenticator, policy=POLICY)])
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {"Call": grpc.unary_unary_rpc_method_handler(_behaviour, _identity, _identity)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, secret
    await server.stop(None)


async def _call(channel: grpc.aio.Channel, body: bytes, secret: str) -> bytes:
    call = channel.unary_unary(
        METHOD, request_serializer=_identity, response_deserializer=_identity
    )
    response: bytes = await call(body, metadata=(("authorization", f"Key {secret}"),))
    return response


async def test_authenticated_call_sees_its_principal(echo: tuple[grpc.aio.Channel, str]) -> None:
    channel, secret = echo
    assert await _call(channel, b"hi", secret) == b"app"


async def test_unexpected_error_is_internal_with_logged_request_id(
    echo: tuple[grpc.aio.Channel, str], caplog: pytest.LogCaptureFixture
) -> None:
    channel, secret = echo
    caplog.set_level(logging.ERROR)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(channel, b"boom", secret)
    error = details_of(raised.value)
    assert error.code == grpc.StatusCode.INTERNAL
    assert error.reason == "INTERNAL"
    assert error.request_id and error.request_id in error.message
    assert "secret internal detail" not in error.message
    assert "Traceback" not in error.message
    logged = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert [getattr(r, "request_id", None) for r in logged] == [error.request_id]
    assert "secret internal detail" in str(logged[0].exc_info)


async def test_domain_error_keeps_its_code_and_reason(echo: tuple[grpc.aio.Channel, str]) -> None:
    channel, secret = echo
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(channel, b"missing", secret)
    error = details_of(raised.value)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.reason == "THING_NOT_FOUND"


async def test_unknown_key_never_reaches_the_handler(echo: tuple[grpc.aio.Channel, str]) -> None:
    channel, _ = echo
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(channel, b"hi", "dsd_unknown-key-000000000000")
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_fake_keys_hold_hashes_only() -> None:
    secret, key = new_key("app", "k")
    assert isinstance(key, ApiKey) and secret not in str(key)


async def test_undecodable_request_is_invalid_argument() -> None:
    """A string field with invalid UTF-8 fails protobuf parsing; the caller must
    hear INVALID_ARGUMENT, not gRPC's INTERNAL "Exception deserializing request"."""
    authenticator, secret = _authenticator()
    server = grpc.aio.server(interceptors=[RequestInterceptor(authenticator, policy=POLICY)])

    async def echo_title(
        request: input_pb2.Input, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        return request.title.encode()

    handler = grpc.method_handlers_generic_handler(
        "test.Typed",
        {
            "Call": grpc.unary_unary_rpc_method_handler(
                echo_title, input_pb2.Input.FromString, _identity
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                "/test.Typed/Call", request_serializer=_identity, response_deserializer=_identity
            )
            metadata = (("authorization", f"Key {secret}"),)
            valid = input_pb2.Input(id="x", title="ABCD").SerializeToString()
            assert await call(valid, metadata=metadata) == b"ABCD"
            broken = valid.replace(b"ABCD", b"\xff\xfe\xfd\xfc")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(broken, metadata=metadata)
    finally:
        await server.stop(None)
    error = details_of(raised.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "MALFORMED_REQUEST"
    assert "UTF-8" in error.message


async def test_method_without_an_access_rule_is_refused() -> None:
    """A method the policy has no rule for never reaches its handler, even for a valid key."""
    authenticator, secret = _authenticator()
    reached: list[bytes] = []

    async def record(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        reached.append(request)
        return request

    server = grpc.aio.server(interceptors=[RequestInterceptor(authenticator)])
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(record, _identity, _identity)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _call(channel, b"hi", secret)
    finally:
        await server.stop(None)
    error = details_of(raised.value)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.reason == "NO_ACCESS_RULE"
    assert reached == []


class _Placement:
    """InputDatasets over a dict, counting its queries."""

    def __init__(self) -> None:
        self.queries: list[tuple[tuple[str, ...], tuple[str, ...], bool]] = []

    async def datasets_of_inputs(
        self,
        app_id: str,
        input_ids: Sequence[str],
        annotation_ids: Sequence[str],
        *,
        trashed: bool = False,
    ) -> tuple[Mapping[str, frozenset[str]], Mapping[str, frozenset[str]]]:
        self.queries.append((tuple(input_ids), tuple(annotation_ids), trashed))
        return {"in-ds": frozenset({"ds"}), "in-other": frozenset({"other"})}, {}


async def _admit_as(principal: Principal, method: str, request: Any, placement: _Placement) -> str:
    authenticator, _ = _authenticator()
    token = PRINCIPAL.set(principal)
    try:
        call = Call(authenticator, "/datasetd.v1.InputService/" + method, (), inputs=placement)
        await call.admitted(request)
    except PermissionDenied as error:
        return error.reason
    finally:
        PRINCIPAL.reset(token)
    return "OK"


async def test_inputs_named_by_id_cost_a_query_only_to_callers_bound_to_datasets() -> None:
    placement = _Placement()
    whole_app = Principal(key_id="k", app_id="app", scopes=frozenset({"read", "write"}))
    bound = Principal(
        key_id="k", app_id="app", scopes=frozenset({"read", "write"}), datasets=frozenset({"ds"})
    )
    read_only = Principal(
        key_id="k", app_id="app", scopes=frozenset({"read"}), datasets=frozenset({"ds"})
    )
    get = input_service_pb2.GetInputRequest(app_id="app", input_id="in-ds")
    assert await _admit_as(whole_app, "GetInput", get, placement) == "OK"
    assert placement.queries == []
    # The key's own scope refuses before any query.
    update = input_service_pb2.UpdateInputsRequest(app_id="app", inputs=[input_pb2.Input(id="x")])
    assert await _admit_as(read_only, "UpdateInputs", update, placement) == "MISSING_SCOPE"
    assert placement.queries == []
    assert await _admit_as(bound, "GetInput", get, placement) == "OK"
    other = input_service_pb2.GetInputRequest(app_id="app", input_id="in-other")
    assert await _admit_as(bound, "GetInput", other, placement) == "INPUT_ACCESS_DENIED"
    delete = input_service_pb2.DeleteInputsRequest(app_id="app", ids=["in-ds", "in-ds"])
    assert await _admit_as(bound, "DeleteInputs", delete, placement) == "OK"
    # No input has such an id: refused without a query (PostgreSQL refuses NUL).
    nul = input_service_pb2.GetInputRequest(app_id="app", input_id="in\x00ds")
    assert await _admit_as(bound, "GetInput", nul, placement) == "INPUT_ACCESS_DENIED"
    assert placement.queries == [
        (("in-ds",), (), False),
        (("in-other",), (), False),
        (("in-ds",), (), True),
    ]


async def test_admit_alone_refuses_what_needs_a_query() -> None:
    """Only `admitted` looks inputs up: the synchronous check never lets them through."""
    authenticator, _ = _authenticator()
    bound = Principal(
        key_id="k", app_id="app", scopes=frozenset({"read"}), datasets=frozenset({"ds"})
    )
    token = PRINCIPAL.set(bound)
    try:
        call = Call(authenticator, "/datasetd.v1.InputService/GetInput", (), inputs=_Placement())
        with pytest.raises(PermissionDenied):
            call.admit(input_service_pb2.GetInputRequest(app_id="app", input_id="in-ds"))
    finally:
        PRINCIPAL.reset(token)
