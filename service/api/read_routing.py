"""Which RPCs may read from the read replica (DATASETD_DATABASE_READ_URL), and the headers
that carry a caller's WAL position between its writes and its reads.

Every RPC of every datasetd.v1 service is in exactly one of READ_ONLY and PRIMARY
(tests/unit/test_read_routing.py fails on one in neither). READ_ONLY lets a call's
single statements outside a transaction and its read-only snapshots
(`TransactionManager.read_transaction`) go to the replica; its other transactions, the
authentication before it and anything that writes still use the primary
(service/storage/replica.py).
"""

from __future__ import annotations

from typing import Final

from service.domain.errors import InvalidArgument
from service.domain.models import Principal
from service.storage.replica import ROUTE, CallRoute, parse_lsn

# Trailing metadata of a call that may have written: the primary's WAL position after it.
LSN_HEADER: Final = "x-datasetd-lsn"
# Request metadata: a read is served from a replica only once it has replayed this far.
MIN_LSN_HEADER: Final = "x-datasetd-min-lsn"

# Reads only: metadata lookups and lists; the downloads read their metadata here and their
# bytes from the object store. Audited: none of their use cases writes or locks rows; the
# reads that need to agree with each other share a read_transaction, a snapshot, where the
# write paths lock (tests/e2e/test_read_replica.py checks each is served by the replica).
READ_ONLY: Final = frozenset(
    {
        "/datasetd.v1.AnnotationService/GetAnnotation",
        "/datasetd.v1.AnnotationService/ListAnnotations",
        "/datasetd.v1.DatasetService/GetDataset",
        "/datasetd.v1.DatasetService/ListDatasets",
        "/datasetd.v1.DatasetService/ListDatasetInputs",
        "/datasetd.v1.DatasetService/GetDatasetInput",
        "/datasetd.v1.DatasetVersionService/GetDatasetVersion",
        "/datasetd.v1.DatasetVersionService/ListDatasetVersions",
        "/datasetd.v1.DatasetVersionService/GetExport",
        "/datasetd.v1.DatasetVersionService/ListExports",
        "/datasetd.v1.DatasetVersionService/DownloadExport",
        "/datasetd.v1.DatasetVersionService/DiffDatasetVersions",
        "/datasetd.v1.InputService/GetInput",
        "/datasetd.v1.InputService/ListInputs",
        "/datasetd.v1.InputService/DownloadInput",
        "/datasetd.v1.InputService/GetInputDownloadUrl",
        "/datasetd.v1.OntologyService/GetOntology",
        "/datasetd.v1.OntologyService/ListOntologies",
        "/datasetd.v1.ProjectService/GetProject",
        "/datasetd.v1.ProjectService/ListProjects",
        "/datasetd.v1.ProjectService/ValidateDataset",
        "/datasetd.v1.SearchService/FindDuplicates",
        "/datasetd.v1.SearchService/GetSearchJob",
        # The query's image or text is embedded in the process; nothing is written.
        "/datasetd.v1.SearchService/SearchInputs",
        "/datasetd.v1.SearchService/ListEmbeddingModels",
        "/datasetd.v1.SearchService/GetInputEmbeddings",
        # Who is in the app and in a dataset, and what happened: what a caller may see is
        # decided before, from the principal the primary authenticated; the listing itself
        # only reads.
        "/datasetd.v1.AccessService/ListUsers",
        "/datasetd.v1.AccessService/ListCollaborators",
        "/datasetd.v1.AccessService/ListAuditEvents",
    }
)

# Writes (and their idempotency records), or reads inside the write they lead to: every
# statement goes to the primary, and the caller's position is remembered after the call.
PRIMARY: Final = frozenset(
    {
        "/datasetd.v1.AnnotationService/CreateAnnotations",
        "/datasetd.v1.AnnotationService/UpdateAnnotations",
        "/datasetd.v1.AnnotationService/DeleteAnnotations",
        "/datasetd.v1.DatasetService/CreateDataset",
        "/datasetd.v1.DatasetService/UpdateDataset",
        "/datasetd.v1.DatasetService/DeleteDataset",
        "/datasetd.v1.DatasetService/UndeleteDataset",
        "/datasetd.v1.DatasetService/AddDatasetInputs",
        "/datasetd.v1.DatasetService/RemoveDatasetInputs",
        "/datasetd.v1.DatasetService/DeleteDatasetInputsByFilter",
        "/datasetd.v1.DatasetService/MergeDataset",
        "/datasetd.v1.DatasetService/ImportDataset",
        "/datasetd.v1.DatasetVersionService/CreateDatasetVersion",
        "/datasetd.v1.DatasetVersionService/UpdateDatasetVersion",
        "/datasetd.v1.DatasetVersionService/DeleteDatasetVersion",
        "/datasetd.v1.DatasetVersionService/CancelDatasetVersionBuild",
        # Creates the export (or returns the one being written).
        "/datasetd.v1.DatasetVersionService/ExportDatasetVersion",
        "/datasetd.v1.InputService/CreateInputs",
        "/datasetd.v1.InputService/UploadInput",
        "/datasetd.v1.InputService/UpdateInputs",
        "/datasetd.v1.InputService/DeleteInputs",
        "/datasetd.v1.InputService/ReencodeInputs",
        "/datasetd.v1.InputService/CancelReencodeJob",
        # A re-encode job is polled for its progress, which its runner writes on the
        # primary: a replica lagging behind would show it going backwards.
        "/datasetd.v1.InputService/GetReencodeJob",
        "/datasetd.v1.OntologyService/CreateOntology",
        "/datasetd.v1.OntologyService/UpdateOntology",
        "/datasetd.v1.OntologyService/DeleteOntology",
        "/datasetd.v1.ProjectService/CreateProject",
        "/datasetd.v1.ProjectService/UpdateProject",
        "/datasetd.v1.ProjectService/DeleteProject",
        "/datasetd.v1.ProjectService/AttachDataset",
        "/datasetd.v1.ProjectService/DetachDataset",
        "/datasetd.v1.AccessService/CreateUser",
        "/datasetd.v1.AccessService/UpdateUser",
        "/datasetd.v1.AccessService/DeleteUser",
        "/datasetd.v1.AccessService/AddCollaborator",
        "/datasetd.v1.AccessService/UpdateCollaborator",
        "/datasetd.v1.AccessService/RemoveCollaborator",
        "/datasetd.v1.AccessService/CreateApiKey",
        "/datasetd.v1.AccessService/RevokeApiKey",
        # The keys are what authentication reads, on the primary: their revocations and
        # last uses (written by the authenticator, outside any caller's write, so a
        # caller's read-your-writes position does not cover them) are shown as they are.
        "/datasetd.v1.AccessService/ListApiKeys",
    }
)


def read_only(method: str) -> bool:
    """Whether the RPC (`/package.Service/Method`) may read from the replica; an RPC in
    neither set (a test service) does not."""
    return method in READ_ONLY


def route_call(method: str, principal: Principal, min_lsn: str) -> CallRoute:
    """Routes the current call's statements (see service/storage/replica.py); `min_lsn`
    is the MIN_LSN_HEADER value, empty when not sent."""
    try:
        needed = parse_lsn(min_lsn) if min_lsn else 0
    except ValueError as exc:
        raise InvalidArgument(
            f"metadata {MIN_LSN_HEADER}: {exc} (send back the {LSN_HEADER} of a write)",
            reason="INVALID_MIN_LSN",
        ) from None
    route = CallRoute(principal.key_id, read_only(method), needed)
    ROUTE.set(route)
    return route
