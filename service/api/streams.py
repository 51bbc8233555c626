"""Client streams made of a header message followed by chunks of bytes (UploadInput,
ImportDataset): the `part` oneof of their request messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol, TypeVar

from service.domain.errors import InvalidArgument


class _Part(Protocol):
    @property
    def chunk(self) -> bytes: ...

    def WhichOneof(self, oneof_group: Literal["part"]) -> str | None: ...


M = TypeVar("M", bound=_Part)


async def header_message(messages: AsyncIterator[M], *, rpc: str, follows: str, reason: str) -> M:
    """The first message, which must carry the header."""
    first = await anext(messages, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument.field(
            "header",
            f"the first message of an {rpc} stream must carry the header; {follows} follow it",
            reason=reason,
        )
    return first


async def chunks(messages: AsyncIterator[M], *, reason: str) -> AsyncIterator[bytes]:
    """The bytes of the messages after the header."""
    async for message in messages:
        part = message.WhichOneof("part")
        if part != "chunk":
            raise InvalidArgument.field(
                "header" if part == "header" else "chunk",
                "only the first message may carry the header"
                if part == "header"
                else "a message after the header carries no chunk",
                reason=reason,
            )
        yield message.chunk
