"""RPC discovery, fuzz cases, and the contract every call must keep.

The contract: whatever a client sends, the status is never UNKNOWN or INTERNAL and the server
answers well within the call's deadline (DEADLINE_EXCEEDED counts as a failure: no RPC is
meant to take seconds on these small resources).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import datasetd.v1
import grpc
from google.protobuf import descriptor, text_format
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from tests.fuzz.strategies import Known, Message, messages, mutated, weighted, wire_integers

T = TypeVar("T")
CALL_TIMEOUT_SECONDS = 10.0
# Past the deadline plus this, the client itself is stuck: reported as a hang.
HANG_GRACE_SECONDS = 5.0
BROKEN = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}
)
DESCRIBE_CHARS = 600
# What grpc.aio reports, as a local INTERNAL status, for a write the transport refused.
WRITE_AFTER_CLOSE = "Internal error from Core"
Metadata = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Rpc:
    method: descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def name(self) -> str:
        return f"{self.method.containing_service.name}.{self.method.name}"

    @property
    def client_streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.method.server_streaming)


def discover() -> list[Rpc]:
    """Every RPC of every datasetd.v1 service, from the generated `*_service_pb2` modules."""
    package = Path(datasetd.v1.__file__).parent
    rpcs: list[Rpc] = []
    for path in sorted(package.glob("*_service_pb2.py")):
        module: Any = importlib.import_module(f"datasetd.v1.{path.stem}")
        file: descriptor.FileDescriptor = module.DESCRIPTOR
        for service in file.services_by_name.values():
            rpcs.extend(Rpc(method) for method in service.methods)
    return rpcs


@dataclasses.dataclass(frozen=True)
class Case:
    rpc: Rpc
    messages: tuple[bytes, ...]  # exactly one unless the RPC streams its requests
    metadata: Metadata
    describe: Callable[[], str]
    # Client streams: cancel after writing this many; server streams: after reading this many.
    cancel_after: int | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    case: Case
    code: grpc.StatusCode | None  # None: the client never got a status
    details: str
    seconds: float
    # The answer of a unary call that succeeded (Clarifai's V2 answers its errors in it).
    response: bytes | None = None

    @property
    def closed_while_writing(self) -> bool:
        """The server ended a client stream while the fuzzer was still writing to it: grpc.aio
        then replaces the call's status with a local INTERNAL, so the server's own status is
        unknowable. Counted apart; the server's INTERNAL never carries this text."""
        return (
            self.case.rpc.client_streaming
            and self.code == grpc.StatusCode.INTERNAL
            and self.details == WRITE_AFTER_CLOSE
        )

    @property
    def broken(self) -> bool:
        return self.code is None or (self.code in BROKEN and not self.closed_while_writing)

    @property
    def label(self) -> str:
        if self.closed_while_writing:
            return "CLOSED_WHILE_WRITING"
        return self.code.name if self.code is not None else "HANG"

    def report(self) -> str:
        case = self.case
        return (
            f"{case.rpc.name}: {self.label} after {self.seconds:.1f}s: {self.details[:300]!r}\n"
            f"    metadata: {_redacted(case.metadata)}, cancel after: {case.cancel_after}\n"
            f"    request: {case.describe()}"
        )


def _redacted(metadata: Metadata) -> str:
    return repr(tuple((k, v[:60]) for k, v in metadata))


def describe(message: Message, note: str = "") -> Callable[[], str]:
    """The request as text, made only when a case is reported: formatting thousands of
    large requests that pass would cost more than sending them."""

    def text() -> str:
        try:
            shown = text_format.MessageToString(message, as_one_line=True, as_utf8=True)
        except Exception as exc:  # protobuf's own depth limit, for the deepest Structs
            shown = f"<not printable: {exc}> {message.SerializeToString()[:200]!r}"
        return _truncated(shown) + note

    return text


def literal(text: str) -> Callable[[], str]:
    return lambda: text


def joined(parts: Sequence[Callable[[], str]]) -> Callable[[], str]:
    return lambda: _truncated(" | ".join(part() for part in parts) or "(no messages)")


def _truncated(text: str) -> str:
    if len(text) <= DESCRIBE_CHARS:
        return text
    return f"{text[:DESCRIBE_CHARS]}… ({len(text)} chars)"


# --- building cases ------------------------------------------------------------------------


def identities(
    caller: Metadata, reader: Metadata, stranger: Metadata
) -> st.SearchStrategy[Metadata]:
    """Mostly the fuzzing app's key; otherwise other rights, or garbage where a key goes."""
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
    garbage: st.SearchStrategy[Metadata] = st.one_of(
        st.sampled_from(
            [
                (),
                (("authorization", ""),),
                (("authorization", "Key"),),
                (("authorization", "Key "),),
                (("authorization", "Bearer abc"),),
                (("authorization", "Key ../../x"),),
                (("authorization", "Key %00"),),
                (("authorization", "Key " + "a" * 4000),),
                (("authorization", "key " + caller[0][1][4:]),),
                (("authorization", caller[0][1] + "x"),),
                (("authorization", caller[0][1][:-1]),),
                (*caller, ("authorization", "Key garbage")),
                (*caller, ("x-request-id", "../" * 50)),
                (*caller, ("x-request-id", "")),
            ]
        ),
        printable.map(lambda value: (("authorization", value),)),
        printable.map(lambda value: (("authorization", "Key " + value),)),
        printable.map(lambda value: (*caller, ("x-request-id", value))),
    )
    return weighted(
        (16, st.just(caller)), (1, st.just(reader)), (1, st.just(stranger)), (2, garbage)
    )


@st.composite
def one_request(draw: st.DrawFn, rpc: Rpc, known: Known) -> tuple[bytes, Callable[[], str]]:
    """One request message's bytes: typed from the descriptor, or raw, or a broken encoding."""
    how = draw(weighted((14, st.just("typed")), (1, st.just("raw")), (2, st.just("mutated"))))
    if how == "raw":
        raw = draw(st.binary(max_size=512))
        return raw, literal(f"raw bytes {raw[:100].hex()} ({len(raw)} bytes)")
    # A calm request has plausible values, so it gets past validation into the use case and
    # the storage beneath (where state left by hostile requests is met); the others are hostile.
    calm = draw(weighted((2, st.just(False)), (1, st.just(True))))
    message = draw(messages(rpc.method.input_type, known, calm=calm))
    encoded = message.SerializeToString()
    if how == "mutated":
        broken = mutated(encoded, draw)
        return broken, describe(message, f" [encoding mutated to {len(broken)} bytes]")
    extra = draw(weighted((5, st.just(b"")), (1, wire_integers(rpc.method.input_type))))
    suffix = f" [+ wire field {extra.hex()}]" if extra else ""
    return encoded + extra, describe(message, suffix)


@st.composite
def ordered_stream(
    draw: st.DrawFn, rpc: Rpc, known: Known
) -> tuple[tuple[bytes, ...], Callable[[], str]]:
    """A stream shaped as the service expects (a header part, then byte parts), with hostile
    headers and content, or cut short: what a well-meaning but broken client sends."""
    message_type = rpc.method.input_type
    oneof = message_type.oneofs[0]
    header = next(f for f in oneof.fields if f.type == f.TYPE_MESSAGE)
    chunk = next(f for f in oneof.fields if f.type == f.TYPE_BYTES)
    assert header.message_type is not None
    head = draw(messages(header.message_type, known, depth=1, calm=draw(st.booleans())))
    first = GetMessageClass(message_type)()
    getattr(first, header.name).CopyFrom(head)
    content = draw(
        st.one_of(st.sampled_from(list(known.blobs)), st.binary(max_size=2048), st.just(b""))
    )
    pieces = draw(st.integers(1, 8))
    size = max(1, -(-len(content) // pieces))
    parts = [first.SerializeToString()]
    for start in range(0, len(content), size):
        part = GetMessageClass(message_type)()
        setattr(part, chunk.name, content[start : start + size])
        parts.append(part.SerializeToString())
    if draw(st.booleans()):
        # A second header, or a header after the content: the order is wrong.
        parts.insert(draw(st.integers(1, len(parts))), first.SerializeToString())
    return tuple(parts), describe(first, f" then {len(parts) - 1} parts")


@st.composite
def cases(
    draw: st.DrawFn,
    rpc: Rpc,
    known: Known,
    metadata: st.SearchStrategy[Metadata],
) -> Case:
    who = draw(metadata)
    if not rpc.client_streaming:
        encoded, text = draw(one_request(rpc, known))
        cancel = None
        if rpc.server_streaming:
            cancel = draw(weighted((9, st.none()), (1, st.integers(0, 2))))
        return Case(rpc, (encoded,), who, text, cancel)
    ordered = bool(rpc.method.input_type.oneofs) and draw(st.booleans())
    if ordered:
        parts, text = draw(ordered_stream(rpc, known))
    else:
        drawn = draw(st.lists(one_request(rpc, known), max_size=6))
        parts = tuple(encoded for encoded, _ in drawn)
        text = joined([text for _, text in drawn])
    cancel = draw(weighted((4, st.none()), (1, st.integers(0, len(parts)))))
    return Case(rpc, parts, who, text, cancel)


def generate(strategy: st.SearchStrategy[T], count: int, seed_value: int) -> list[T]:
    """`count` examples of `strategy`, the same ones for the same seed.

    Hypothesis cannot drive an async test, so it only generates here and the calls are made
    afterwards on the test's loop; a failing case is reported whole (request, metadata and
    status) instead of shrunk.
    """
    drawn: list[T] = []

    @seed(seed_value)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: T) -> None:
        drawn.append(value)

    collect()
    return drawn


# --- calling ------------------------------------------------------------------------------


async def call(channel: grpc.aio.Channel, case: Case) -> Outcome:
    started = time.perf_counter()
    try:
        code, details, response = await asyncio.wait_for(
            _call(channel, case), CALL_TIMEOUT_SECONDS + HANG_GRACE_SECONDS
        )
    except TimeoutError:
        return Outcome(case, None, "the client got no status", time.perf_counter() - started)
    return Outcome(case, code, details, time.perf_counter() - started, response)


async def _call(channel: grpc.aio.Channel, case: Case) -> tuple[grpc.StatusCode, str, bytes | None]:
    rpc, timeout, metadata = case.rpc, CALL_TIMEOUT_SECONDS, case.metadata
    cancel_at = case.cancel_after
    cancelled = False
    try:
        # No serializers: the messages go out as the bytes they are, valid or not.
        if rpc.client_streaming:
            streaming: grpc.aio.StreamUnaryMultiCallable[bytes, bytes]
            streaming = channel.stream_unary(rpc.path)
            stream = streaming(timeout=timeout, metadata=metadata)
            for part in case.messages[:cancel_at]:
                try:
                    await stream.write(part)
                except asyncio.InvalidStateError:
                    break  # the server already answered; its status is what counts
            if cancel_at is not None:
                cancelled = stream.cancel()
            else:
                with contextlib.suppress(asyncio.InvalidStateError):
                    await stream.done_writing()
            await stream
            return await stream.code(), await stream.details(), None
        if rpc.server_streaming:
            streamed: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
            streamed = channel.unary_stream(rpc.path)
            responses = streamed(case.messages[0], timeout=timeout, metadata=metadata)
            if cancel_at == 0:
                cancelled = responses.cancel()
            else:
                received = 0
                async for _ in responses:
                    received += 1
                    if received == cancel_at:
                        cancelled = responses.cancel()
                        break
            return await responses.code(), await responses.details(), None
        single: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(rpc.path)
        unary = single(case.messages[0], timeout=timeout, metadata=metadata)
        answer = await unary
        return await unary.code(), await unary.details(), answer
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or "", None
    except asyncio.CancelledError:
        # Awaiting a call the fuzzer cancelled raises this; any other cancellation propagates.
        if not cancelled:
            raise
        return grpc.StatusCode.CANCELLED, "cancelled by the fuzzer", None


async def run(
    channel: grpc.aio.Channel, batch: Sequence[Case], concurrency: int = 6
) -> list[Outcome]:
    """Calls every case, `concurrency` at a time (concurrent writers are part of the attack)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(case: Case) -> Outcome:
        async with gate:
            return await call(channel, case)

    return list(await asyncio.gather(*(one(case) for case in batch)))


def verdict(outcomes: Sequence[Outcome], limit: int = 8) -> str:
    """Empty when every outcome kept the contract; otherwise the first broken ones, readable."""
    broken = [o for o in outcomes if o.broken]
    if not broken:
        return ""
    by_code: dict[str, int] = {}
    for outcome in broken:
        key = f"{outcome.case.rpc.name} {outcome.label}"
        by_code[key] = by_code.get(key, 0) + 1
    summary = ", ".join(f"{key} x{count}" for key, count in sorted(by_code.items()))
    shown = "\n".join(o.report() for o in broken[:limit])
    return f"{len(broken)} of {len(outcomes)} calls broke the contract ({summary}):\n{shown}"
