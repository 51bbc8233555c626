"""The access rules' reading of requests: which datasets a request names, when it is
app-wide, and the ids an audit event keeps."""

from __future__ import annotations

import pytest
from clarifai_grpc.grpc.api import service_pb2 as v2_service_pb2
from datasetd.v1 import (
    access_service_pb2,
    annotation_service_pb2,
    dataset_service_pb2,
    dataset_version_service_pb2,
    input_pb2,
    input_service_pb2,
    search_service_pb2,
)

from service.api.access_policy import (
    MAX_RESOURCE_IDS,
    POLICY,
    UNSUPPORTED_V2,
    Named,
    Rule,
    check_named,
    reaches_named,
    resource_ids,
)
from service.domain.access import Action, Resource
from service.domain.errors import PermissionDenied
from service.domain.models import AppRole, DatasetRole, KeyKind, Principal

DS = "/datasetd.v1.DatasetService/"
INPUTS = "/datasetd.v1.InputService/"
ANNOTATIONS = "/datasetd.v1.AnnotationService/"
V2 = "/clarifai.api.V2/"


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


# --- inputs and annotations named by id -----------------------------------------------------


def _rule(method: str) -> Rule:
    rule = POLICY.rule(method)
    assert rule is not None and rule.inputs is not None, method
    return rule


def test_rules_read_the_inputs_and_annotations_a_request_names() -> None:
    update = _rule(ANNOTATIONS + "UpdateAnnotations")
    request = annotation_service_pb2.UpdateAnnotationsRequest(app_id="app")
    request.annotations.add(id="a1", input_id="i1")
    request.annotations.add(id="a2")
    request.annotations.add(id="a1", input_id="i1")
    assert update.target(request) == (Resource.APP, ())
    assert update.inputs is not None
    assert update.inputs(request) == Named(("i1",), ("a1", "a2"))
    create = _rule(ANNOTATIONS + "CreateAnnotations")
    assert create.inputs is not None
    made = annotation_service_pb2.CreateAnnotationsRequest(app_id="app")
    # An annotation without its input names nothing (the use case refuses it).
    made.annotations.add(input_id="")
    assert not create.inputs(made)
    made.annotations.add(input_id="i2")
    assert create.inputs(made) == Named(("i2",))
    v2_get = _rule(V2 + "GetAnnotation")
    assert v2_get.inputs is not None
    got = v2_get.inputs(v2_service_pb2.GetAnnotationRequest(input_id="i", annotation_id="a"))
    assert got == Named(("i",), ("a",))


def test_only_deleting_inputs_needs_every_dataset_holding_them() -> None:
    every = {name for name, rule in POLICY.rules.items() if rule.inputs is not None and rule.every}
    assert every == {
        INPUTS + "DeleteInputs",
        V2 + "DeleteInput",
        V2 + "DeleteInputs",
    }
    get = _rule(INPUTS + "GetInput")
    assert get.action is Action.READ and not get.mutates


def test_annotations_listed_by_dataset_by_input_or_over_the_app() -> None:
    rule = _rule(ANNOTATIONS + "ListAnnotations")
    assert rule.inputs is not None
    request = annotation_service_pb2.ListAnnotationsRequest(app_id="app")
    assert rule.target(request) == (Resource.APP, ()) and not rule.inputs(request)
    request.input_ids.append("i1")
    assert rule.target(request) == (Resource.APP, ())
    assert rule.inputs(request) == Named(("i1",))
    request.dataset_id = "d"
    assert rule.target(request) == (Resource.DATASETS, ("d",))


@pytest.mark.parametrize("method", [INPUTS + "ListInputs", INPUTS + "GetReencodeJob"])
def test_lists_and_jobs_over_the_app_stay_app(method: str) -> None:
    rule = POLICY.rule(method)
    assert rule is not None and rule.inputs is None


def _personal(roles: dict[str, DatasetRole], app_role: AppRole = AppRole.MEMBER) -> Principal:
    return Principal(
        key_id="k",
        app_id="app",
        scopes=frozenset({"read", "write"}),
        user_id="u",
        kind=KeyKind.PERSONAL,
        app_role=app_role,
        dataset_roles=roles,
    )


def _bound(datasets: set[str], scopes: tuple[str, ...] = ("read", "write")) -> Principal:
    return Principal(
        key_id="k", app_id="app", scopes=frozenset(scopes), datasets=frozenset(datasets)
    )


ADMIN_OF_D1 = _personal({"d1": DatasetRole.ADMIN})
VIEWER_OF_D1 = _personal({"d1": DatasetRole.VIEWER})
PLACED = (
    {"in-d1": frozenset({"d1"}), "in-both": frozenset({"d1", "d2"}), "in-d2": frozenset({"d2"})}
    | {"in-none": frozenset()},
    {"ann-d1": frozenset({"d1"}), "ann-d2": frozenset({"d2"})},
)


def _refusal(principal: Principal, method: str, ids: Named) -> str | None:
    try:
        check_named(principal, _rule(method), ids, PLACED)
    except PermissionDenied as error:
        assert error.reason == "INPUT_ACCESS_DENIED"
        return str(error)
    return None


@pytest.mark.parametrize("principal", [ADMIN_OF_D1, _bound({"d1"})])
def test_a_dataset_writer_changes_inputs_held_by_its_dataset_only(principal: Principal) -> None:
    update = INPUTS + "UpdateInputs"
    assert _refusal(principal, update, Named(("in-d1", "in-both"))) is None
    assert _refusal(principal, ANNOTATIONS + "DeleteAnnotations", Named((), ("ann-d1",))) is None
    assert _refusal(principal, update, Named(("in-d1", "in-d2"))) is not None
    assert _refusal(principal, update, Named(("in-none",))) is not None
    assert _refusal(principal, ANNOTATIONS + "GetAnnotation", Named((), ("ann-d2",))) is not None
    # Deleting removes the input from every dataset: each must allow it.
    delete = INPUTS + "DeleteInputs"
    assert _refusal(principal, delete, Named(("in-d1",))) is None
    assert _refusal(principal, delete, Named(("in-both",))) is not None


def test_an_unknown_id_is_refused_like_an_input_of_another_dataset() -> None:
    get = INPUTS + "GetInput"
    unknown = _refusal(VIEWER_OF_D1, get, Named(("nope",)))
    foreign = _refusal(VIEWER_OF_D1, get, Named(("in-d2",)))
    assert unknown is not None and foreign is not None
    assert unknown.replace("nope", "X") == foreign.replace("in-d2", "X")


def test_a_viewer_reads_but_does_not_change_inputs_of_its_dataset() -> None:
    assert _refusal(VIEWER_OF_D1, INPUTS + "GetInput", Named(("in-both",))) is None
    assert _refusal(VIEWER_OF_D1, V2 + "PatchInputs", Named(("in-d1",))) is not None


def test_without_the_port_only_app_wide_callers_pass() -> None:
    with pytest.raises(PermissionDenied):
        check_named(ADMIN_OF_D1, _rule(INPUTS + "GetInput"), Named(("in-d1",)), None)


def test_callers_no_dataset_can_help_need_no_query() -> None:
    assert reaches_named(ADMIN_OF_D1, Action.WRITE)
    assert reaches_named(VIEWER_OF_D1, Action.READ)
    assert not reaches_named(VIEWER_OF_D1, Action.WRITE)
    assert not reaches_named(_personal({}), Action.READ)
    assert not reaches_named(_bound({"d1"}, ("read",)), Action.WRITE)
    assert reaches_named(_bound({"d1"}, ("read",)), Action.READ)
