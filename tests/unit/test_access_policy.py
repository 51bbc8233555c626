"""The access rules' reading of requests: which datasets a request names, when it is
app-wide, and the ids an audit event keeps."""

from __future__ import annotations

from datasetd.v1 import (
    access_service_pb2,
    dataset_service_pb2,
    dataset_version_service_pb2,
    input_pb2,
    input_service_pb2,
    search_service_pb2,
)

from service.api.access_policy import MAX_RESOURCE_IDS, POLICY, UNSUPPORTED_V2, resource_ids
from service.domain.access import Action, Resource

DS = "/datasetd.v1.DatasetService/"
INPUTS = "/datasetd.v1.InputService/"


def test_inputs_in_datasets_need_those_datasets_and_app_wide_ones_the_app() -> None:
    rule = POLICY.rule(INPUTS + "CreateInputs")
    assert rule is not None and rule.action is Action.WRITE
    in_datasets = input_service_pb2.CreateInputsRequest(
        inputs=[
            input_pb2.Input(id="a", dataset_ids=["d1", "d2"]),
            input_pb2.Input(id="b", dataset_ids=["d2"]),
        ]
    )
    assert rule.target(in_datasets) == (Resource.DATASETS, ("d1", "d2"))
    # One input in no dataset makes the whole call app-wide.
    in_datasets.inputs.add(id="c")
    assert rule.target(in_datasets) == (Resource.APP, ())


def test_merge_writes_the_destination_and_reads_the_source() -> None:
    rule = POLICY.rule(DS + "MergeDataset")
    assert rule is not None
    request = dataset_service_pb2.MergeDatasetRequest(
        app_id="app", source_dataset_id="src", destination_dataset_id="dst"
    )
    assert (rule.action, rule.target(request)) == (Action.WRITE, (Resource.DATASETS, ("dst",)))
    assert rule.reads(request) == ("src",)
    assert rule.audited_datasets(request, ("dst",)) == ("dst", "src")


def test_a_search_without_a_scope_reads_the_app() -> None:
    rule = POLICY.rule("/datasetd.v1.SearchService/SearchInputs")
    assert rule is not None
    scoped = search_service_pb2.SearchInputsRequest(app_id="app")
    assert rule.target(scoped) == (Resource.APP, ())
    scoped.query.scope.dataset_id = "d"
    assert rule.target(scoped) == (Resource.DATASETS, ("d",))


def test_stream_messages_without_a_header_need_no_check() -> None:
    rule = POLICY.rule(DS + "ImportDataset")
    assert rule is not None
    assert rule.subject(dataset_service_pb2.ImportDatasetRequest(chunk=b"x")) is None
    header = dataset_service_pb2.ImportDatasetRequest()
    header.header.app_id, header.header.dataset_id = "app", "d"
    subject = rule.subject(header)
    assert subject is not None and rule.app_id(subject) == "app"
    assert rule.target(subject) == (Resource.DATASETS, ("d",))


def test_keys_and_audit_are_left_to_the_domain() -> None:
    for name in ("CreateApiKey", "ListApiKeys", "RevokeApiKey", "ListAuditEvents"):
        rule = POLICY.rule("/datasetd.v1.AccessService/" + name)
        assert rule is not None and rule.domain, name
    create = POLICY.rule("/datasetd.v1.AccessService/CreateApiKey")
    assert create is not None and create.mutates
    request = access_service_pb2.CreateApiKeyRequest(app_id="app")
    request.api_key.dataset_ids.extend(["d1", "d2"])
    assert create.audited_datasets(request, ()) == ("d1", "d2")


def test_unknown_methods_have_no_rule_and_unsupported_v2_ones_answer_only() -> None:
    assert POLICY.rule("/datasetd.v1.DatasetService/RenameDataset") is None
    assert POLICY.rule("/clarifai.api.V2/PostModelOutputs") is UNSUPPORTED_V2
    assert POLICY.rule("/clarifai.api.V2/GetDataset") is not UNSUPPORTED_V2


def test_resource_ids_skip_app_dataset_and_request_ids_and_stop_at_the_limit() -> None:
    request = input_service_pb2.DeleteInputsRequest(
        app_id="app", ids=[f"i{n}" for n in range(150)], request_id="r"
    )
    ids = resource_ids(request)
    assert len(ids) == MAX_RESOURCE_IDS and ids[0] == "i0" and "app" not in ids
    version = dataset_service_pb2.GetDatasetInputRequest(
        app_id="app", dataset_id="d", input_id="in"
    )
    assert resource_ids(version) == ("in",)


def test_resource_ids_skip_maps_and_free_form_values() -> None:
    request = dataset_version_service_pb2.UpdateDatasetVersionRequest(
        app_id="app", dataset_id="d", request_id="r"
    )
    request.version.id = "v"
    request.version.metrics["train"].inputs_count.value = 1
    request.version.metadata.update({"input_id": "not an id"})
    assert resource_ids(request) == ("v",)


def test_a_request_naming_no_dataset_acts_on_the_app() -> None:
    rule = POLICY.rule(DS + "GetDataset")
    assert rule is not None
    assert rule.target(dataset_service_pb2.GetDatasetRequest(app_id="app")) == (Resource.APP, ())
