"""The synchronous `service.client` library against the real in-process server.

The client blocks, and the server runs on the test's event loop, so every
client call goes through `asyncio.to_thread`: called directly it would wait
for a server that can never answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import pytest

from service.app import Running
from service.client import (
    AlreadyExistsError,
    Client,
    DatasetdError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)
from tests.conftest import Caller

T = TypeVar("T")


async def run(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


async def fails(call: Callable[[], object]) -> DatasetdError:
    """Runs a call that must fail and returns the typed error it raised."""
    try:
        await run(call)
    except DatasetdError as error:
        return error
    raise AssertionError("the call succeeded but was expected to fail")


@pytest.fixture
def client(server: Running, caller: Caller) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}", caller.key, caller.app_id) as opened:
        yield opened


async def test_create_get_and_info(client: Client, capsys: pytest.CaptureFixture[str]) -> None:
    created = await run(
        lambda: client.datasets.create(
            "cats", description="Cat photos", notes="line one\nline two", metadata={"k": 1}
        )
    )
    assert created.id == "cats" and created.app_id == client.app
    assert created.etag

    got = await run(lambda: client.datasets.get("cats"))
    assert got.description == "Cat photos"
    assert got.metadata == {"k": 1}
    assert got.visibility == "PRIVATE"
    assert got.created_at is not None and got.created_at.tzinfo is not None
    assert got.statistic.asset_total == 0
    assert got.statistic.asset_annotated == 0
    assert got.statistic.annotation_total == 0
    assert got.statistic.tags_count == {}

    text = got.info()
    assert "cats" in text and "Cat photos" in text and "line two" in text
    assert text in capsys.readouterr().out


async def test_generated_id_and_idempotent_create(client: Client) -> None:
    first = await run(lambda: client.datasets.create(description="x", request_id="req-1"))
    again = await run(lambda: client.datasets.create(description="x", request_id="req-1"))
    assert len(first.id) == 32
    assert again.id == first.id


async def test_list_pages_and_all_items(client: Client) -> None:
    def create_five() -> None:
        for n in range(5):
            client.datasets.create(f"d{n}", description=f"number {n}")

    await run(create_five)

    pages = await run(lambda: list(client.datasets.list(page_size=2)))
    assert [len(page.items) for page in pages] == [2, 2, 1]
    assert all(page.next_page_token for page in pages[:-1])
    assert pages[-1].next_page_token == ""
    paged_ids = [item.id for page in pages for item in page.items]
    assert sorted(paged_ids) == [f"d{n}" for n in range(5)]

    every = await run(lambda: [d.id for d in client.datasets.all_items()])
    assert every == paged_ids

    matched = await run(lambda: [d.id for d in client.datasets.all_items(query="NUMBER 3")])
    assert matched == ["d3"]


async def test_list_of_an_empty_app_is_one_empty_page(client: Client) -> None:
    pages = await run(lambda: list(client.datasets.list()))
    assert len(pages) == 1 and pages[0].items == [] and pages[0].next_page_token == ""


async def test_patch_merge_overwrite_and_remove(client: Client) -> None:
    await run(
        lambda: client.datasets.create(
            "p", description="old", notes="n", metadata={"a": {"x": 1, "y": 2}}
        )
    )
    merged = await run(
        lambda: client.datasets.patch(
            "p", action="merge", description="new", metadata={"a": {"z": 3}}
        )
    )
    assert merged.description == "new"
    assert merged.metadata == {"a": {"x": 1, "y": 2, "z": 3}}
    assert merged.notes == "n"

    removed = await run(
        lambda: client.datasets.patch("p", action="remove", notes="", metadata={"a": {"x": True}})
    )
    assert removed.metadata == {"a": {"y": 2, "z": 3}}
    assert removed.notes == ""

    # An empty value only overwrites because the mask names the field.
    cleared = await run(lambda: client.datasets.patch("p", action="overwrite", description=""))
    assert cleared.description == ""
    assert (await run(lambda: client.datasets.get("p"))).metadata == {"a": {"y": 2, "z": 3}}


async def test_patch_with_a_stale_etag_is_aborted(client: Client) -> None:
    created = await run(lambda: client.datasets.create("e"))
    await run(lambda: client.datasets.patch("e", description="changed", etag=created.etag))
    error = await fails(lambda: client.datasets.patch("e", description="x", etag=created.etag))
    assert error.code == grpc.StatusCode.ABORTED
    assert error.reason == "ETAG_MISMATCH"


async def test_patch_needs_a_field_and_a_known_action(client: Client) -> None:
    with pytest.raises(ValueError, match="at least one"):
        client.datasets.patch("p")
    with pytest.raises(ValueError, match="action"):
        client.datasets.patch("p", action="replace", notes="x")  # type: ignore[arg-type]


async def test_delete_undelete_and_force(client: Client) -> None:
    await run(lambda: client.datasets.create("gone", description="keep me"))
    deleted = await run(lambda: client.datasets.delete("gone"))
    assert not deleted.purged and deleted.purge_time is not None

    error = await fails(lambda: client.datasets.get("gone"))
    assert isinstance(error, NotFoundError)

    restored = await run(lambda: client.datasets.undelete("gone"))
    assert restored.description == "keep me"
    not_deleted = await fails(lambda: client.datasets.undelete("gone"))
    assert isinstance(not_deleted, FailedPreconditionError)

    purged = await run(lambda: client.datasets.delete("gone", force=True))
    assert purged.purged and purged.purge_time is None
    assert isinstance(await fails(lambda: client.datasets.undelete("gone")), NotFoundError)


async def test_typed_errors(client: Client, server: Running, caller: Caller) -> None:
    missing = await fails(lambda: client.datasets.get("nope"))
    assert isinstance(missing, NotFoundError)
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert missing.reason == "DATASET_NOT_FOUND"
    assert "nope" in missing.message

    invalid = await fails(lambda: client.datasets.create("bad id!"))
    assert isinstance(invalid, InvalidArgumentError)
    assert "dataset.id" in invalid.field_violations
    assert "[A-Za-z0-9_-]" in invalid.field_violations["dataset.id"]

    await run(lambda: client.datasets.create("dup"))
    duplicate = await fails(lambda: client.datasets.create("dup"))
    assert isinstance(duplicate, AlreadyExistsError)
    assert duplicate.reason == "DATASET_EXISTS"
    assert "ALREADY_EXISTS" in str(duplicate)

    with Client(f"127.0.0.1:{server.port}", "not-a-key", caller.app_id) as stranger:
        unauthenticated = await fails(lambda: stranger.datasets.get("dup"))
    assert isinstance(unauthenticated, UnauthenticatedError)
    assert unauthenticated.code == grpc.StatusCode.UNAUTHENTICATED
