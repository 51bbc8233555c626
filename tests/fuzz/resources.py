"""Real resources for the fuzzer to aim at: one app with datasets, inputs, an annotation, a
READY version and an export, made through the public API like any caller would."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import zipfile

import grpc
from datasetd.v1 import (
    access_pb2,
    access_service_pb2,
    access_service_pb2_grpc,
    annotation_pb2,
    annotation_service_pb2,
    annotation_service_pb2_grpc,
    data_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    dataset_version_pb2,
    dataset_version_service_pb2,
    dataset_version_service_pb2_grpc,
    input_pb2,
    input_service_pb2,
    input_service_pb2_grpc,
    ontology_pb2,
    ontology_service_pb2,
    ontology_service_pb2_grpc,
    project_pb2,
    project_service_pb2,
    project_service_pb2_grpc,
    status_pb2,
)
from google.protobuf import descriptor, struct_pb2

from service.api.field_policy import OUTPUT_ONLY
from service.domain.auth import ensure_bootstrap_key, new_key
from service.domain.models import AppRole, KeyKind, User
from service.storage.access import PgUserRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.db import Database
from tests.conftest import Caller, new_caller
from tests.fuzz.strategies import Known
from tests.helpers import png_bytes
from tests.unit.test_media import mp4

DATASET_IDS = ("fuzz-a", "fuzz-b")
INPUT_IDS = ("fuzz-img-1", "fuzz-img-2", "fuzz-text-1", "fuzz-img-3")
ANNOTATION_IDS = ("fuzz-ann-1",)
VERSION_IDS = ("fuzz-v1",)
ONTOLOGY_IDS = ("fuzz-onto-1", "fuzz-onto-2")
PROJECT_IDS = ("fuzz-proj-1", "fuzz-proj-2")
CONCEPT_IDS = ("cat", "dog")
# "owner" is the app owner the AccessService RPCs are fuzzed as (`Resources.manager`).
USER_IDS = ("owner", "fuzz-user-1", "fuzz-user-2")
READY = status_pb2.STATUS_CODE_DATASET_VERSION_READY
FAILURE = status_pb2.STATUS_CODE_DATASET_VERSION_FAILURE
EXPORT_DONE = (
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_SUCCESS,
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_FAILED,
    status_pb2.STATUS_CODE_DATASET_VERSION_EXPORT_UNEXPECTED_ERROR,
)
SETUP_TIMEOUT_SECONDS = 60.0
# Statuses a setup call may meet when an earlier fuzz batch already made or removed the thing.
_EXPECTED = (
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
)


@dataclasses.dataclass
class Resources:
    """The app the fuzzer attacks, callers with other rights, and what exists in the app."""

    channel: grpc.aio.Channel
    caller: Caller
    reader: Caller  # scopes ("read",) in the same app
    stranger: Caller  # another app
    # The app owner's personal key: AccessService manages nothing for the scoped keys
    # above, so its RPCs are fuzzed as the owner (restored by `ensure` when a batch
    # demoted or deleted the owner).
    manager: Caller
    db: Database
    key_ids: list[str] = dataclasses.field(default_factory=list)
    export_ids: list[str] = dataclasses.field(default_factory=list)
    reencode_job_ids: list[str] = dataclasses.field(default_factory=list)
    page_tokens: list[str] = dataclasses.field(default_factory=list)
    archive: bytes = b""

    @property
    def access(self) -> access_service_pb2_grpc.AccessServiceAsyncStub:
        return access_service_pb2_grpc.AccessServiceStub(self.channel)

    @property
    def datasets(self) -> dataset_service_pb2_grpc.DatasetServiceAsyncStub:
        return dataset_service_pb2_grpc.DatasetServiceStub(self.channel)

    @property
    def inputs(self) -> input_service_pb2_grpc.InputServiceAsyncStub:
        return input_service_pb2_grpc.InputServiceStub(self.channel)

    @property
    def annotations(self) -> annotation_service_pb2_grpc.AnnotationServiceAsyncStub:
        return annotation_service_pb2_grpc.AnnotationServiceStub(self.channel)

    @property
    def ontologies(self) -> ontology_service_pb2_grpc.OntologyServiceAsyncStub:
        return ontology_service_pb2_grpc.OntologyServiceStub(self.channel)

    @property
    def projects(self) -> project_service_pb2_grpc.ProjectServiceAsyncStub:
        return project_service_pb2_grpc.ProjectServiceStub(self.channel)

    @property
    def versions(self) -> dataset_version_service_pb2_grpc.DatasetVersionServiceAsyncStub:
        return dataset_version_service_pb2_grpc.DatasetVersionServiceStub(self.channel)

    def known(self, field_paths: tuple[str, ...]) -> Known:
        return Known(
            app_id=self.caller.app_id,
            ids={
                "dataset": DATASET_IDS,
                "input": INPUT_IDS,
                "annotation": ANNOTATION_IDS,
                "version": VERSION_IDS,
                "export": tuple(self.export_ids),
                "job": tuple(self.reencode_job_ids),
                "concept": CONCEPT_IDS,
                "ontology": ONTOLOGY_IDS,
                "project": PROJECT_IDS,
                "user": USER_IDS,
                "key": tuple(self.key_ids),
            },
            page_tokens=tuple(self.page_tokens),
            field_paths=field_paths,
            blobs=self.blobs(),
            output_only=frozenset(OUTPUT_ONLY),
        )

    def blobs(self) -> tuple[bytes, ...]:
        """Content worth streaming: a real image, a real export archive, a tiny COCO zip."""
        coco = io.BytesIO()
        with zipfile.ZipFile(coco, "w") as archive:
            archive.writestr(
                "annotations.json",
                '{"images":[{"id":1,"file_name":"a.png","width":8,"height":6}],'
                '"annotations":[{"id":1,"image_id":1,"category_id":1,"bbox":[1e309,0,1,1]}],'
                '"categories":[{"id":1,"name":"cat"}]}',
            )
            archive.writestr("a.png", png_bytes())
        return (png_bytes(), self.archive, coco.getvalue())


async def _tolerating(call: object) -> None:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        if error.code() not in _EXPECTED:
            raise


def _inputs() -> list[input_pb2.Input]:
    meta = struct_pb2.Struct()
    meta.update({"split": "train", "n": 1, "nested": {"a": [1, "b", None]}})
    made = []
    for number, input_id in enumerate(INPUT_IDS):
        if "text" in input_id:
            data = data_pb2.Data(text=data_pb2.Text(raw="a fuzzing text"))
        else:
            data = data_pb2.Data(
                image=data_pb2.Image(base64=png_bytes(16, 12, (number * 40, 20, 30))),
                concepts=[data_pb2.Concept(id=CONCEPT_IDS[number % 2], value=1.0)],
            )
        data.metadata.CopyFrom(meta)
        made.append(input_pb2.Input(id=input_id, data=data))
    return made


async def ensure(res: Resources) -> None:
    """Brings back what earlier fuzz batches deleted, so every batch can reach deep code."""
    app, md = res.caller.app_id, res.caller.metadata
    for dataset_id in DATASET_IDS:
        await _tolerating(
            res.datasets.UndeleteDataset(
                dataset_service_pb2.UndeleteDatasetRequest(app_id=app, dataset_id=dataset_id),
                metadata=md,
            )
        )
        await _tolerating(
            res.datasets.CreateDataset(
                dataset_service_pb2.CreateDatasetRequest(
                    app_id=app, dataset=dataset_pb2.Dataset(id=dataset_id)
                ),
                metadata=md,
            )
        )
    await _tolerating(
        res.inputs.CreateInputs(
            input_service_pb2.CreateInputsRequest(app_id=app, inputs=_inputs()), metadata=md
        )
    )
    await _tolerating(
        res.datasets.AddDatasetInputs(
            dataset_service_pb2.AddDatasetInputsRequest(
                app_id=app, dataset_id=DATASET_IDS[0], input_ids=INPUT_IDS
            ),
            metadata=md,
        )
    )
    region = data_pb2.Region(
        region_info=data_pb2.RegionInfo(
            bounding_box=data_pb2.BoundingBox(
                top_row=0.1, left_col=0.1, bottom_row=0.5, right_col=0.5
            )
        ),
        data=data_pb2.Data(concepts=[data_pb2.Concept(id="cat", value=1.0)]),
    )
    await _tolerating(
        res.annotations.CreateAnnotations(
            annotation_service_pb2.CreateAnnotationsRequest(
                app_id=app,
                annotations=[
                    annotation_pb2.Annotation(
                        id=ANNOTATION_IDS[0],
                        input_id=INPUT_IDS[0],
                        data=data_pb2.Data(regions=[region]),
                    )
                ],
            ),
            metadata=md,
        )
    )
    for ontology_id in ONTOLOGY_IDS:
        await _tolerating(
            res.ontologies.CreateOntology(
                ontology_service_pb2.CreateOntologyRequest(
                    app_id=app, ontology=_ontology(ontology_id)
                ),
                metadata=md,
            )
        )
    for project_id in PROJECT_IDS:
        await _tolerating(
            res.projects.CreateProject(
                project_service_pb2.CreateProjectRequest(
                    app_id=app,
                    project=project_pb2.Project(id=project_id, ontology_id=ONTOLOGY_IDS[0]),
                ),
                metadata=md,
            )
        )
        await _tolerating(
            res.projects.AttachDataset(
                project_service_pb2.AttachDatasetRequest(
                    app_id=app, project_id=project_id, dataset_id=DATASET_IDS[0]
                ),
                metadata=md,
            )
        )
    for version_id in VERSION_IDS:
        await _ensure_version(res, version_id)
    await _ensure_access(res)


async def _ensure_access(res: Resources) -> None:
    """The owner with a working personal key, the fuzzing users, a collaborator and a key
    bound to a dataset."""
    app = res.caller.app_id
    users = PgUserRepository(res.db)
    owner = await users.get(app, USER_IDS[0])
    if owner is None:
        await users.insert(User(app_id=app, id=USER_IDS[0], role=AppRole.OWNER))
    elif owner.role is not AppRole.OWNER:
        await users.update(dataclasses.replace(owner, role=AppRole.OWNER))
    try:
        await res.access.ListUsers(
            access_service_pb2.ListUsersRequest(app_id=app, page_size=1),
            metadata=res.manager.metadata,
        )
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        # Revoked, or gone with its user: a new personal key of the owner.
        secret, key = new_key(app, "fuzz-owner")
        await PgApiKeyRepository(res.db).insert(
            dataclasses.replace(key, kind=KeyKind.PERSONAL, user_id=USER_IDS[0])
        )
        res.manager = Caller(app, secret)
    md = res.manager.metadata
    for user_id in USER_IDS[1:]:
        await _tolerating(
            res.access.CreateUser(
                access_service_pb2.CreateUserRequest(app_id=app, user=access_pb2.User(id=user_id)),
                metadata=md,
            )
        )
    await _tolerating(
        res.access.AddCollaborator(
            access_service_pb2.AddCollaboratorRequest(
                app_id=app,
                dataset_id=DATASET_IDS[0],
                collaborator=access_pb2.Collaborator(user_id=USER_IDS[1]),
            ),
            metadata=md,
        )
    )
    if not res.key_ids:
        made = await res.access.CreateApiKey(
            access_service_pb2.CreateApiKeyRequest(
                app_id=app,
                api_key=access_pb2.ApiKey(
                    kind=access_pb2.KEY_KIND_SCOPED,
                    access=access_pb2.KEY_ACCESS_READ,
                    dataset_ids=[DATASET_IDS[0]],
                ),
            ),
            metadata=md,
        )
        res.key_ids.append(made.api_key.id)


def _ontology(ontology_id: str) -> ontology_pb2.Ontology:
    """Classes the fuzzing app's annotation uses (removing them reaches the in-use check),
    with every kind of attribute."""
    attributes = [
        ontology_pb2.OntologyAttribute(
            id="colour", name="Colour", enum_type=ontology_pb2.EnumAttribute(options=["red"])
        ),
        ontology_pb2.OntologyAttribute(
            id="big", name="Big", boolean=ontology_pb2.BooleanAttribute()
        ),
        ontology_pb2.OntologyAttribute(
            id="n", name="N", number=ontology_pb2.NumberAttribute(min=0, max=1)
        ),
        ontology_pb2.OntologyAttribute(id="note", name="Note", text=ontology_pb2.TextAttribute()),
    ]
    return ontology_pb2.Ontology(
        id=ontology_id,
        classes=[
            ontology_pb2.OntologyClass(
                id=CONCEPT_IDS[0],
                color="#FF0000",
                shapes=[ontology_pb2.SHAPE_BOUNDING_BOX, ontology_pb2.SHAPE_KEYPOINTS],
                keypoint_names=["head"],
                attributes=attributes,
                sub_classes=[
                    ontology_pb2.OntologyClass(id="kitten", shapes=[ontology_pb2.SHAPE_POINT])
                ],
            )
        ],
        input_classifications=[
            ontology_pb2.OntologyClass(
                id=CONCEPT_IDS[1], shapes=[ontology_pb2.SHAPE_CLASSIFICATION]
            )
        ],
    )


async def _ensure_version(res: Resources, version_id: str) -> None:
    app, md, dataset_id = res.caller.app_id, res.caller.metadata, DATASET_IDS[0]
    status = None
    for _ in range(2):
        await _tolerating(
            res.versions.CreateDatasetVersion(
                dataset_version_service_pb2.CreateDatasetVersionRequest(
                    app_id=app,
                    dataset_id=dataset_id,
                    version=dataset_version_pb2.DatasetVersion(id=version_id),
                ),
                metadata=md,
            )
        )
        status = await _settled(res, version_id)
        if status != FAILURE:
            break
        # Cancelled by a batch: built again, so that reads reach a READY version's data.
        await _tolerating(
            res.versions.DeleteDatasetVersion(
                dataset_version_service_pb2.DeleteDatasetVersionRequest(
                    app_id=app, dataset_id=dataset_id, version_id=version_id
                ),
                metadata=md,
            )
        )
    if status == READY and not await _export_exists(res, version_id):
        await _export(res, version_id)


async def _settled(res: Resources, version_id: str) -> int | None:
    """The version's status once its build ended; None when it does not exist."""
    deadline = asyncio.get_running_loop().time() + SETUP_TIMEOUT_SECONDS
    while True:
        try:
            got = await res.versions.GetDatasetVersion(
                dataset_version_service_pb2.GetDatasetVersionRequest(
                    app_id=res.caller.app_id, dataset_id=DATASET_IDS[0], version_id=version_id
                ),
                metadata=res.caller.metadata,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in _EXPECTED:
                return None
            raise
        if got.version.status.code in (READY, FAILURE):
            return got.version.status.code
        assert asyncio.get_running_loop().time() < deadline, f"build hangs: {got.version.status}"
        await asyncio.sleep(0.05)


async def _export_exists(res: Resources, version_id: str) -> bool:
    for export_id in res.export_ids:
        try:
            await res.versions.GetExport(
                dataset_version_service_pb2.GetExportRequest(
                    app_id=res.caller.app_id,
                    dataset_id=DATASET_IDS[0],
                    version_id=version_id,
                    export_id=export_id,
                ),
                metadata=res.caller.metadata,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        else:
            return True
    return False


async def _export(res: Resources, version_id: str) -> None:
    app, md, dataset_id = res.caller.app_id, res.caller.metadata, DATASET_IDS[0]
    started = await res.versions.ExportDatasetVersion(
        dataset_version_service_pb2.ExportDatasetVersionRequest(
            app_id=app,
            dataset_id=dataset_id,
            version_id=version_id,
            format=dataset_version_pb2.EXPORT_FORMAT_COCO,
        ),
        metadata=md,
    )
    # The version was rebuilt (a batch deleted it): the old export went with it.
    res.export_ids[:] = [started.export.id]
    deadline = asyncio.get_running_loop().time() + SETUP_TIMEOUT_SECONDS
    while True:
        got = await res.versions.GetExport(
            dataset_version_service_pb2.GetExportRequest(
                app_id=app,
                dataset_id=dataset_id,
                version_id=version_id,
                export_id=started.export.id,
            ),
            metadata=md,
        )
        if got.export.status.code in EXPORT_DONE:
            break
        assert asyncio.get_running_loop().time() < deadline, f"export hangs: {got.export.status}"
        await asyncio.sleep(0.05)
    if got.export.status.code != EXPORT_DONE[0]:
        return
    chunks = res.versions.DownloadExport(
        dataset_version_service_pb2.DownloadExportRequest(
            app_id=app, dataset_id=dataset_id, version_id=version_id, export_id=started.export.id
        ),
        metadata=md,
    )
    res.archive = b"".join([message.chunk async for message in chunks])


async def _page_tokens(res: Resources) -> list[str]:
    app, md = res.caller.app_id, res.caller.metadata
    inputs = await res.inputs.ListInputs(
        input_service_pb2.ListInputsRequest(app_id=app, page_size=1), metadata=md
    )
    datasets = await res.datasets.ListDatasets(
        dataset_service_pb2.ListDatasetsRequest(app_id=app, page_size=1), metadata=md
    )
    members = await res.datasets.ListDatasetInputs(
        dataset_service_pb2.ListDatasetInputsRequest(
            app_id=app, dataset_id=DATASET_IDS[0], page_size=1
        ),
        metadata=md,
    )
    ontologies = await res.ontologies.ListOntologies(
        ontology_service_pb2.ListOntologiesRequest(app_id=app, page_size=1), metadata=md
    )
    tokens = (
        inputs.next_page_token,
        datasets.next_page_token,
        members.next_page_token,
        ontologies.next_page_token,
    )
    return [token for token in tokens if token]


async def open_resources(db: Database, channel: grpc.aio.Channel) -> Resources:
    caller = await new_caller(db)
    async with db.transaction():
        owner = await ensure_bootstrap_key(
            PgApiKeyRepository(db), PgUserRepository(db), caller.app_id, None
        )
    assert owner is not None
    res = Resources(
        channel=channel,
        caller=caller,
        reader=await _same_app_reader(db, caller),
        stranger=await new_caller(db),
        manager=Caller(caller.app_id, owner),
        db=db,
    )
    await ensure(res)
    res.page_tokens = await _page_tokens(res)
    res.reencode_job_ids = [await _reencode_job(res)]
    return res


async def _reencode_job(res: Resources) -> str:
    """A re-encode job for GetReencodeJob and CancelReencodeJob to find (of a video of its
    own, so that the fuzzed calls cannot change the inputs the other RPCs aim at)."""
    app, md = res.caller.app_id, res.caller.metadata
    video = input_pb2.Input(id="fuzz-vid-1", data=data_pb2.Data(video=data_pb2.Video(base64=mp4())))
    await _tolerating(
        res.inputs.CreateInputs(
            input_service_pb2.CreateInputsRequest(app_id=app, inputs=[video]), metadata=md
        )
    )
    started = await res.inputs.ReencodeInputs(
        input_service_pb2.ReencodeInputsRequest(app_id=app, input_ids=[video.id]), metadata=md
    )
    return started.job.id


async def _same_app_reader(db: Database, caller: Caller) -> Caller:
    secret, key = new_key(caller.app_id, "fuzz-reader")
    await PgApiKeyRepository(db).insert(dataclasses.replace(key, scopes=("read",)))
    return Caller(caller.app_id, secret)


def field_paths(messages: list[descriptor.Descriptor]) -> tuple[str, ...]:
    """Names an update_mask may hold: the fields of the messages and of the messages in them."""
    paths: set[str] = set()
    for message in messages:
        for field in message.fields:
            paths.add(field.name)
            if field.message_type is not None:
                for inner in field.message_type.fields:
                    paths.update((inner.name, f"{field.name}.{inner.name}"))
    return tuple(sorted(paths))
