"""clarifai.api.V2 input RPCs through clarifai-grpc's own stub; state read back natively."""

from __future__ import annotations

import asyncio
import math
import re
import types
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, TypeVar, cast

import grpc
from clarifai.client.base import BaseClient
from clarifai_grpc.grpc.api import resources_pb2, service_pb2, service_pb2_grpc
from clarifai_grpc.grpc.api.status import status_code_pb2, status_pb2
from datasetd.v1 import input_service_pb2 as iapi
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from service.app import Running
from tests.conftest import Caller
from tests.e2e.clarifai.v2 import scope
from tests.helpers import call_error, png_bytes

if TYPE_CHECKING:
    from datasetd.v1.input_service_pb2_grpc import InputServiceAsyncStub as Inputs

M = TypeVar("M", bound=Message)
SUCCESS = status_code_pb2.SUCCESS
STORED = status_code_pb2.INPUT_DOWNLOAD_SUCCESS
INVALID = status_code_pb2.INPUT_INVALID_ARGUMENT
MISSING = status_code_pb2.CONN_DOES_NOT_EXIST


def image(
    input_id: str = "", color: tuple[int, int, int] = (10, 20, 30), **data: object
) -> resources_pb2.Input:
    return resources_pb2.Input(
        id=input_id,
        data=resources_pb2.Data(
            image=resources_pb2.Image(base64=png_bytes(16, 12, color)),
            **data,
        ),
    )


def labels(*ids: str) -> list[resources_pb2.Concept]:
    return [resources_pb2.Concept(id=i, name=i.upper(), value=1.0) for i in ids]


def metadata(**values: str | float) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


async def post(
    v2: service_pb2_grpc.V2Stub, caller: Caller, items: list[resources_pb2.Input], job: str = ""
) -> service_pb2.MultiInputResponse:
    response: service_pb2.MultiInputResponse = await v2.PostInputs(
        service_pb2.PostInputsRequest(
            user_app_id=scope(caller), inputs=items, inputs_add_job_id=job
        ),
        metadata=caller.metadata,
    )
    return response


async def native_input(inputs: Inputs, caller: Caller, input_id: str) -> iapi.GetInputResponse:
    response: iapi.GetInputResponse = await inputs.GetInput(
        iapi.GetInputRequest(app_id=caller.app_id, input_id=input_id), metadata=caller.metadata
    )
    return response


def sdk_rebuilt(response: Message, message_type: type[M]) -> list[M]:
    """The listed items as the SDK's lister rebuilds them: MessageToDict, its key
    conversion (timestamps re-parsed at microsecond precision), `Type(**dict)`."""
    as_dict = json_format.MessageToDict(response, preserving_proto_field_name=True)
    kind = list(as_dict)[1]
    stand_in = types.SimpleNamespace(
        convert_string_to_timestamp=lambda text: BaseClient.convert_string_to_timestamp(
            cast(BaseClient, None), text
        )
    )
    rebuilt = []
    for item in as_dict[kind]:
        converted = BaseClient.process_response_keys(cast(BaseClient, stand_in), item, kind[:-1])
        converted["id"] = converted.pop(f"{kind[:-1]}_id")
        rebuilt.append(message_type(**converted))
    return rebuilt


def fetch(url: str, key: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Key {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


async def test_post_inputs_reports_every_input_and_stores_the_good_ones(
    v2: service_pb2_grpc.V2Stub, inputs: Inputs, caller: Caller
) -> None:
    made = await v2.PostDatasets(
        service_pb2.PostDatasetsRequest(
            user_app_id=scope(caller), datasets=[resources_pb2.Dataset(id="ds")]
        ),
        metadata=caller.metadata,
    )
    assert made.status.code == SUCCESS, made.status
    labelled = image(
        "a",
        concepts=labels("cat", "dog"),
        metadata=metadata(source="cam", n=1),
        geo=resources_pb2.Geo(geo_point=resources_pb2.GeoPoint(longitude=-122.4, latitude=37.75)),
    )
    labelled.dataset_ids.append("ds")
    unsupported = image("settings")
    unsupported.settings.sample_rate_ms = 500
    colors = image("colors")
    colors.data.colors.add(raw_hex="#ffffff")
    answer = await post(
        v2,
        caller,
        [
            labelled,
            resources_pb2.Input(id="t", data=resources_pb2.Data(text=resources_pb2.Text(raw="hi"))),
            image(),
            image("a", (1, 2, 3)),
            unsupported,
            resources_pb2.Input(
                id="broken", data=resources_pb2.Data(image=resources_pb2.Image(base64=b"no"))
            ),
            colors,
        ],
        job="job-1",
    )
    assert answer.status.code == status_code_pb2.MIXED_STATUS, answer.status
    codes = [i.status.code for i in answer.inputs]
    assert codes == [STORED, STORED, STORED, status_code_pb2.INPUT_DUPLICATE] + [INVALID] * 3
    assert answer.inputs[3].status.details == "Input has a duplicate ID."
    generated = answer.inputs[2].id
    assert re.fullmatch("[0-9a-f]{32}", generated), generated
    assert "inputs[4].settings" in answer.inputs[4].status.details
    assert "inputs[5].data.image" in answer.inputs[5].status.details
    assert "inputs[6].data.colors" in answer.inputs[6].status.details
    assert [i.id for i in answer.inputs[4:]] == ["settings", "broken", "colors"]
    # Stored as posted: input-level labels stay on the input, membership holds.
    stored = (await native_input(inputs, caller, "a")).input
    assert [(c.id, c.name, c.value) for c in stored.data.concepts] == [
        ("cat", "CAT", 1.0),
        ("dog", "DOG", 1.0),
    ]
    assert dict(stored.data.metadata) == {"source": "cam", "n": 1.0}
    assert math.isclose(stored.data.geo.geo_point.longitude, -122.4, rel_tol=1e-6)
    assert list(stored.dataset_ids) == ["ds"]
    assert stored.data.image.image_info.width == 16
    assert (await native_input(inputs, caller, generated)).input.id == generated
    for refused in ("settings", "broken", "colors"):
        error = await call_error(native_input(inputs, caller, refused))
        assert error.code == grpc.StatusCode.NOT_FOUND
    # The posted response names the labels as they were stored.
    assert [c.id for c in answer.inputs[0].data.concepts] == ["cat", "dog"]

    job = await v2.GetInputsAddJob(
        service_pb2.GetInputsAddJobRequest(user_app_id=scope(caller), id="job-1"),
        metadata=caller.metadata,
    )
    assert job.status.code == SUCCESS, job.status
    progress = job.inputs_add_job.progress
    assert (progress.pending_count, progress.in_progress_count) == (0, 0)
    assert (progress.success_count, progress.failed_count) == (3, 4)
    unknown = await v2.GetInputsAddJob(
        service_pb2.GetInputsAddJobRequest(user_app_id=scope(caller), id="never-posted"),
        metadata=caller.metadata,
    )
    assert unknown.status.code == SUCCESS
    assert unknown.inputs_add_job.progress.success_count == 0
    cancelled = await v2.CancelInputsAddJob(
        service_pb2.CancelInputsAddJobRequest(user_app_id=scope(caller), id="job-1"),
        metadata=caller.metadata,
    )
    assert cancelled.status.code == SUCCESS and "nothing was cancelled" in cancelled.status.details
    jobs = await v2.ListInputsAddJobs(
        service_pb2.ListInputsAddJobsRequest(user_app_id=scope(caller)), metadata=caller.metadata
    )
    assert [j.id for j in jobs.inputs_add_jobs] == ["job-1"]

    nothing = await post(v2, caller, [image("a"), unsupported])
    assert nothing.status.code == status_code_pb2.FAILURE
    assert [i.status.code for i in nothing.inputs] == [status_code_pb2.INPUT_DUPLICATE, INVALID]


async def test_byte_uploads_get_a_url_and_no_bytes(
    v2: service_pb2_grpc.V2Stub, server: Running, caller: Caller
) -> None:
    posted = await post(v2, caller, [image("png", (200, 30, 30))])
    assert posted.status.code == SUCCESS, posted.status
    got = await v2.GetInput(
        service_pb2.GetInputRequest(user_app_id=scope(caller), input_id="png"),
        metadata=caller.metadata,
    )
    assert got.status.code == SUCCESS, got.status
    media = got.input.data.image
    bad_id = await v2.GetInput(
        service_pb2.GetInputRequest(user_app_id=scope(caller), input_id="not an id!"),
        metadata=caller.metadata,
    )
    assert bad_id.status.code == INVALID and "input_id" in bad_id.status.details, bad_id.status
    assert media.base64 == b"" and not media.HasField("hosted")
    parsed = urllib.parse.urlsplit(media.url)
    assert parsed.path == f"/v2/downloads/apps/{caller.app_id}/inputs/png"
    status, body = await asyncio.to_thread(fetch, media.url, caller.key)
    assert status == 200 and body == png_bytes(16, 12, (200, 30, 30))
    listed = await v2.ListInputs(
        service_pb2.ListInputsRequest(user_app_id=scope(caller)), metadata=caller.metadata
    )
    assert listed.inputs[0].status.code == STORED
    [rebuilt] = sdk_rebuilt(listed, resources_pb2.Input)
    assert rebuilt == listed.inputs[0]


async def test_list_inputs_honours_ids_status_and_pages(
    v2: service_pb2_grpc.V2Stub, caller: Caller
) -> None:
    ids = [f"in{n}" for n in range(5)]
    posted = await post(v2, caller, [image(i, (n, n, n)) for n, i in enumerate(ids)])
    assert posted.status.code == SUCCESS, posted.status

    async def listed(**fields: object) -> service_pb2.MultiInputResponse:
        response: service_pb2.MultiInputResponse = await v2.ListInputs(
            service_pb2.ListInputsRequest(user_app_id=scope(caller), **fields),
            metadata=caller.metadata,
        )
        assert response.status.code == SUCCESS, response.status
        return response

    # The SDK's check after each chunk: ids plus status 30000, per_page = len(ids).
    chunk = ["in1", "in3", "never-stored"]
    found = await listed(ids=chunk, per_page=len(chunk), status=status_pb2.Status(code=STORED))
    assert [i.id for i in found.inputs] == ["in1", "in3"]
    pending = await listed(ids=chunk, status=status_pb2.Status(code=status_code_pb2.INPUT_PENDING))
    assert list(pending.inputs) == []
    pages = [[i.id for i in (await listed(page=p, per_page=2)).inputs] for p in range(1, 5)]
    assert pages == [["in0", "in1"], ["in2", "in3"], ["in4"], []]
    assert list((await listed(page=1000, per_page=500)).inputs) == []

    async def stream(**fields: object) -> service_pb2.MultiInputResponse:
        response: service_pb2.MultiInputResponse = await v2.StreamInputs(
            service_pb2.StreamInputsRequest(user_app_id=scope(caller), **fields),
            metadata=caller.metadata,
        )
        return response

    first = await stream(per_page=2)
    assert [i.id for i in first.inputs] == ["in0", "in1"]
    after = await stream(per_page=2, last_id="in1")
    assert [i.id for i in after.inputs] == ["in2", "in3"]
    assert [i.id for i in (await stream(last_id="in3")).inputs] == ["in4"]
    assert list((await stream(last_id="in4")).inputs) == []
    assert [i.id for i in (await stream()).inputs] == ids
    descending = await stream(descending=True)
    assert descending.status.code == INVALID
    assert "descending" in descending.status.details
    gone = await stream(last_id="nope")
    assert gone.status.code == MISSING, gone.status

    count = await v2.GetInputCount(
        service_pb2.GetInputCountRequest(user_app_id=scope(caller)), metadata=caller.metadata
    )
    assert count.status.code == SUCCESS and count.counts.processed == 5


async def test_patch_inputs(v2: service_pb2_grpc.V2Stub, inputs: Inputs, caller: Caller) -> None:
    posted = await post(
        v2,
        caller,
        [image("p", concepts=labels("pos"), metadata=metadata(key1="v1"))],
    )
    assert posted.status.code == SUCCESS, posted.status

    async def patch(action: str, *items: resources_pb2.Input) -> service_pb2.MultiInputResponse:
        response: service_pb2.MultiInputResponse = await v2.PatchInputs(
            service_pb2.PatchInputsRequest(user_app_id=scope(caller), inputs=items, action=action),
            metadata=caller.metadata,
        )
        return response

    merged = await patch(
        "merge",
        resources_pb2.Input(
            id="p",
            data=resources_pb2.Data(concepts=labels("another"), metadata=metadata(new="k")),
        ),
    )
    assert merged.status.code == SUCCESS, merged.status
    stored = (await native_input(inputs, caller, "p")).input
    assert [c.id for c in stored.data.concepts] == ["pos", "another"]
    assert dict(stored.data.metadata) == {"key1": "v1", "new": "k"}
    removed = await patch(
        "remove",
        resources_pb2.Input(
            id="p", data=resources_pb2.Data(concepts=[resources_pb2.Concept(id="pos")])
        ),
    )
    assert removed.status.code == SUCCESS, removed.status
    stored = (await native_input(inputs, caller, "p")).input
    assert [c.id for c in stored.data.concepts] == ["another"]
    overwritten = await patch(
        "overwrite",
        resources_pb2.Input(
            id="p", data=resources_pb2.Data(concepts=[resources_pb2.Concept(id="only", value=1)])
        ),
    )
    assert overwritten.status.code == SUCCESS, overwritten.status
    stored = (await native_input(inputs, caller, "p")).input
    assert [(c.id, c.name) for c in stored.data.concepts] == [("only", "only")]
    assert not stored.data.HasField("metadata") or dict(stored.data.metadata) == {}
    assert stored.data.image.image_info.width == 16  # media stay
    # Get-modify-overwrite (the docs' way): the echoed media and output-only fields
    # are ignored, the rest is what is stored after.
    echoed = (
        await v2.GetInput(
            service_pb2.GetInputRequest(user_app_id=scope(caller), input_id="p"),
            metadata=caller.metadata,
        )
    ).input
    echoed.data.concepts[0].name = "Only"
    echoed.data.metadata.update({"after": "get"})
    again = await patch("overwrite", echoed)
    assert again.status.code == SUCCESS, again.status
    stored = (await native_input(inputs, caller, "p")).input
    assert [(c.id, c.name) for c in stored.data.concepts] == [("only", "Only")]
    assert dict(stored.data.metadata) == {"after": "get"}
    assert stored.data.image.image_info.width == 16
    unknown = await patch(
        "merge", resources_pb2.Input(id="zzz", data=resources_pb2.Data(concepts=labels("x")))
    )
    assert unknown.status.code == MISSING, unknown.status
    nan = await patch(
        "merge",
        resources_pb2.Input(
            id="p",
            data=resources_pb2.Data(
                geo=resources_pb2.Geo(
                    geo_point=resources_pb2.GeoPoint(longitude=math.nan, latitude=1)
                )
            ),
        ),
    )
    # Floats are checked for every request before any part runs (the interceptor), which
    # answers with the inputs' own code, naming the field.
    assert nan.status.code == status_code_pb2.INPUT_INVALID_ARGUMENT, nan.status
    assert "inputs[0].data.geo.geo_point.longitude" in nan.status.details
    colors = resources_pb2.Input(id="p")
    colors.data.colors.add(raw_hex="#000000")
    refused = await patch("merge", colors)
    assert refused.status.code == INVALID and "inputs[0].data.colors" in refused.status.details
    bad_action = await patch("replace", resources_pb2.Input(id="p"))
    assert bad_action.status.code == INVALID and "action" in bad_action.status.details


async def test_delete_inputs(v2: service_pb2_grpc.V2Stub, inputs: Inputs, caller: Caller) -> None:
    posted = await post(v2, caller, [image(i, (n, n, n)) for n, i in enumerate("pqr")])
    assert posted.status.code == SUCCESS, posted.status

    async def delete_one(input_id: str) -> status_pb2.BaseResponse:
        response: status_pb2.BaseResponse = await v2.DeleteInput(
            service_pb2.DeleteInputRequest(user_app_id=scope(caller), input_id=input_id),
            metadata=caller.metadata,
        )
        return response

    assert (await delete_one("nope")).status.code == MISSING
    assert (await delete_one("p")).status.code == SUCCESS
    error = await call_error(native_input(inputs, caller, "p"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    gone = await v2.GetInput(
        service_pb2.GetInputRequest(user_app_id=scope(caller), input_id="p"),
        metadata=caller.metadata,
    )
    assert gone.status.code == MISSING

    async def delete_many(*ids: str) -> status_pb2.BaseResponse:
        response: status_pb2.BaseResponse = await v2.DeleteInputs(
            service_pb2.DeleteInputsRequest(user_app_id=scope(caller), ids=ids),
            metadata=caller.metadata,
        )
        return response

    # The SDK deletes the ids of failed uploads (never stored) and sends empty lists.
    assert (await delete_many()).status.code == SUCCESS
    partly = await delete_many("q", "never-stored")
    assert partly.status.code == SUCCESS and "never-stored" in partly.status.details
    error = await call_error(native_input(inputs, caller, "q"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert (await native_input(inputs, caller, "r")).input.id == "r"
