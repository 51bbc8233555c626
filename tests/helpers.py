"""What a caller sees of an error: code, reason and field violations."""

from __future__ import annotations

import io
import urllib.request
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

T = TypeVar("T")


@dataclass(frozen=True)
class CallError:
    code: grpc.StatusCode
    message: str
    reason: str
    fields: dict[str, str]
    request_id: str


def details_of(error: grpc.aio.AioRpcError | grpc.Call) -> CallError:
    """Of an asyncio call's error, or of a synchronous call's (a grpc.Call too)."""
    reason, request_id, fields = "", "", {}
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    request_id = info.metadata.get("request_id", "")
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    fields = {v.field: v.description for v in bad.field_violations}
    return CallError(error.code(), error.details() or "", reason, fields, request_id)


async def call_error(call: Awaitable[T]) -> CallError:
    """Awaits a call that must fail and returns what the caller sees."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return details_of(error)
    raise AssertionError("the call succeeded but was expected to fail")


def download(url: str) -> bytes:
    """Fetches a (presigned) URL the way any HTTP client would."""
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read()
        return data


def png_bytes(
    width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()
