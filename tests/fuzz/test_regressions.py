"""What the fuzz suite found, pinned down one request at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from datasetd.v1 import common_pb2, dataset_pb2
from datasetd.v1 import dataset_service_pb2 as dapi
from datasetd.v1 import input_service_pb2 as api

from tests.conftest import Caller
from tests.helpers import call_error

if TYPE_CHECKING:
    from datasetd.v1.dataset_service_pb2_grpc import DatasetServiceAsyncStub as Datasets
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs


async def test_a_nul_in_a_filter_concept_id_is_invalid_argument(
    inputs: Inputs, datasets: Datasets, caller: Caller
) -> None:
    """PostgreSQL refuses NUL in text: this query reached it and failed as INTERNAL."""
    await datasets.CreateDataset(
        dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset_pb2.Dataset(id="ds")),
        metadata=caller.metadata,
    )
    ids = ["cat", "a\x00b"]
    filters = {
        "concept_ids": common_pb2.InputFilter(concept_ids=ids),
        "negative_concept_ids": common_pb2.InputFilter(negative_concept_ids=ids),
    }
    for field, nul in filters.items():
        listed = await call_error(
            inputs.ListInputs(
                api.ListInputsRequest(app_id=caller.app_id, filter=nul), metadata=caller.metadata
            )
        )
        deleted = await call_error(
            datasets.DeleteDatasetInputsByFilter(
                dapi.DeleteDatasetInputsByFilterRequest(
                    app_id=caller.app_id, dataset_id="ds", filter=nul, dry_run=True
                ),
                metadata=caller.metadata,
            )
        )
        for error in (listed, deleted):
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
            assert error.fields == {f"filter.{field}[1]": "must not contain NUL characters"}


async def test_a_nul_in_a_default_filter_concept_id_is_invalid_argument(
    datasets: Datasets, caller: Caller
) -> None:
    """Stored as jsonb, which refuses NUL as PostgreSQL text does."""
    dataset = dataset_pb2.Dataset(
        id="ds", default_filter=common_pb2.InputFilter(concept_ids=["\x00"])
    )
    error = await call_error(
        datasets.CreateDataset(
            dapi.CreateDatasetRequest(app_id=caller.app_id, dataset=dataset),
            metadata=caller.metadata,
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.fields == {
        "dataset.default_filter.concept_ids[0]": "must not contain NUL characters"
    }
