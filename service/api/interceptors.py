"""Every call passes through here: request id, authentication, error mapping, access log."""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.api.errors import internal_status, to_rpc_status
from service.domain.auth import Authenticator, parse_authorization
from service.domain.errors import DomainError
from service.domain.models import Principal
from service.observability import REQUEST_ID

log = logging.getLogger("datasetd.access")

PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "principal", default=None
)
# Infrastructure services a load balancer or grpcurl must reach without a key.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def current_principal() -> Principal:
    principal = PRINCIPAL.get()
    if principal is None:
        raise RuntimeError("no authenticated caller in this context")
    return principal


class RequestInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        if method.startswith(PUBLIC_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata or ()
        authorization = [str(v) for k, v in metadata if k == "authorization"]
        client_request_id = next((str(v) for k, v in metadata if k == _REQUEST_ID_HEADER), "")
        kwargs: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        async def begin(context: grpc.aio.ServicerContext[Any, Any]) -> str:
            request_id = (
                client_request_id
                if _CLIENT_REQUEST_ID.match(client_request_id)
                else uuid.uuid4().hex
            )
            REQUEST_ID.set(request_id)
            context.set_trailing_metadata(((_REQUEST_ID_HEADER, request_id),))
            secret = parse_authorization(authorization)
            PRINCIPAL.set(await self._authenticator.authenticate(secret))
            return request_id

        async def fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
            request_id = REQUEST_ID.get()
            if isinstance(exc, DomainError):
                status = to_rpc_status(exc, request_id)
            else:
                log.error("unexpected error in %s", method, exc_info=exc)
                status = internal_status(request_id)
            trailing = (*status.trailing_metadata, (_REQUEST_ID_HEADER, request_id))
            await context.abort(status.code, status.details, trailing)

        def done(started: float, outcome: str) -> None:
            log.info(
                "%s %s %.1fms",
                method,
                outcome,
                (time.perf_counter() - started) * 1000,
                extra={"method": method, "outcome": outcome},
            )

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started, outcome = time.perf_counter(), "OK"
                try:
                    await begin(context)
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    outcome = "ABORTED_BY_HANDLER"
                    raise
                except Exception as exc:
                    outcome = getattr(getattr(exc, "kind", None), "value", "INTERNAL")
                    await fail(context, exc)
                finally:
                    done(started, outcome)

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(unary_response, **kwargs)

        inner_stream = handler.unary_stream or handler.stream_stream

        async def stream_response(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started, outcome = time.perf_counter(), "OK"
            try:
                await begin(context)
                async for item in inner_stream(request, context):
                    yield item
            except grpc.aio.AbortError:
                outcome = "ABORTED_BY_HANDLER"
                raise
            except Exception as exc:
                outcome = getattr(getattr(exc, "kind", None), "value", "INTERNAL")
                await fail(context, exc)
            finally:
                done(started, outcome)

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(stream_response, **kwargs)
