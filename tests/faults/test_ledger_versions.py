"""The ledger's version rules can fail (the storms rely on them): a version is READY when
created or not there at all, and every member of it refers to intact content."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest
from datasetd.v1 import data_pb2, dataset_pb2, dataset_version_pb2, input_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import dataset_version_service_pb2 as vapi
from datasetd.v1 import input_service_pb2 as api

from service.storage.db import Database
from tests.conftest import Caller, Stack, object_store
from tests.faults.ledger import Ledger, check_ledger

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub
    from datasetd.v1.dataset_version_service_pb2_grpc import DatasetVersionServiceAsyncStub
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub


async def test_the_ledger_check_finds_partial_and_broken_versions(
    stack: Stack,
    db: Database,
    caller: Caller,
    datasets: DatasetServiceAsyncStub,
    inputs: InputServiceAsyncStub,
    versions: DatasetVersionServiceAsyncStub,
) -> None:
    app = caller.app_id
    await datasets.CreateDataset(
        dapi.CreateDatasetRequest(app_id=app, dataset=dataset_pb2.Dataset(id="d")),
        metadata=caller.metadata,
    )
    texts = [
        input_pb2.Input(
            id=f"t{n}", data=data_pb2.Data(text=data_pb2.Text(raw=f"text {n}")), dataset_ids=["d"]
        )
        for n in range(3)
    ]
    await inputs.CreateInputs(
        api.CreateInputsRequest(app_id=app, inputs=texts), metadata=caller.metadata
    )
    ledger = Ledger()
    for n in range(3):
        text = f"text {n}".encode()
        ledger.acknowledged(app, f"t{n}", hashlib.sha256(text).hexdigest(), ("d",))
    for version_id in ("v1", "v2"):
        await versions.CreateDatasetVersion(
            vapi.CreateDatasetVersionRequest(
                app_id=app,
                dataset_id="d",
                version=dataset_version_pb2.DatasetVersion(id=version_id),
            ),
            metadata=caller.metadata,
        )
        ledger.version(app, "d", version_id)
    objects = object_store(stack)
    try:
        report = await check_ledger(db, objects, ledger)
        assert (report.ready_versions, report.version_members) == (2, 6)

        # A version that is not READY, acknowledged or not, is a partial creation.
        await db.execute(
            "UPDATE dataset_versions SET status = 'in_progress' WHERE app_id = $1 AND id = 'v2'",
            app,
        )
        with pytest.raises(AssertionError, match="d/v2: in_progress; versions are READY"):
            await check_ledger(db, objects, ledger)
        await db.execute(
            "UPDATE dataset_versions SET status = 'ready' WHERE app_id = $1 AND id = 'v2'", app
        )

        # A member whose reference names no content.
        original = await db.fetchval(
            "SELECT content_hash FROM version_inputs"
            " WHERE app_id = $1 AND version_id = 'v1' AND input_id = 't1'",
            app,
        )
        await db.execute(
            "UPDATE version_inputs SET content_hash = $2"
            " WHERE app_id = $1 AND version_id = 'v1' AND input_id = 't1'",
            app,
            b"\x00" * 32,
        )
        try:
            with pytest.raises(AssertionError, match="d/v1/t1: content missing or not its hash"):
                await check_ledger(db, objects, ledger)
        finally:
            await db.execute(
                "UPDATE version_inputs SET content_hash = $2"
                " WHERE app_id = $1 AND version_id = 'v1' AND input_id = 't1'",
                app,
                original,
            )
        # A member referring to another input's content.
        other = await db.fetchval(
            "SELECT content_hash FROM version_inputs"
            " WHERE app_id = $1 AND version_id = 'v1' AND input_id = 't2'",
            app,
        )
        await db.execute(
            "UPDATE version_inputs SET content_hash = $2"
            " WHERE app_id = $1 AND version_id = 'v2' AND input_id = 't0'",
            app,
            other,
        )
        with pytest.raises(AssertionError, match="d/v2/t0: content is input 't2'"):
            await check_ledger(db, objects, ledger)
    finally:
        objects.close()
