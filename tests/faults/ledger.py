"""The ledger check: what clients were told against what the database and the object store hold.

Fault tests record every acknowledgement (an OK response) in a `Ledger` while they inject
faults, and every attempt that was not acknowledged. Afterwards `check_ledger` reads
PostgreSQL and S3 directly (not through the server) and fails with every problem found:

* every acknowledged input is present exactly once, in its datasets, and its object in S3
  has the bytes that were sent (read back and hashed);
* nothing that was never acknowledged is half-present: every input row has its blob row
  and its object with the right bytes, and no bytes appear that no client sent, nor more
  copies than were sent;
* every version is READY (a version commits READY in CreateDatasetVersion's transaction,
  or not at all) and complete: its count matches its members, each member's content is
  there (the input_contents row it refers to, whose bytes match its hash and parse as an
  Input of that id) and each referenced original exists in S3;
* every export the server reported as succeeded has its archive in S3, of its size, and
  every archive a client downloaded is a complete zip.

`collect_and_check_orphans` runs the orphan collector with a zero grace period and then
requires a one-to-one match between `blobs` rows and objects, no unreferenced row, and
nothing left of uploads cut off mid-stream (no `uploads/` object, no unfinished multipart
upload).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from datasetd.v1 import input_pb2
from minio.error import S3Error

from service.storage.blobs import REFERENCED, UPLOADS_PREFIX, ContentAddressedBlobStore
from service.storage.db import Database
from service.storage.objectstore import ObjectStore

BLOBS_PREFIX = "blobs/"


@dataclass(frozen=True)
class AckedInput:
    sha256: str
    dataset_ids: tuple[str, ...] = ()


@dataclass
class AppLedger:
    """What one app's clients were told, and what they tried without being told."""

    # input id → what it was created with, for every OK response that created an input.
    inputs: dict[str, AckedInput] = field(default_factory=dict)
    # sha256 of media sent in a call that was never acknowledged (it may have committed).
    unacknowledged: Counter[str] = field(default_factory=Counter)
    # (dataset id, version id) of every acknowledged CreateDatasetVersion.
    versions: set[tuple[str, str]] = field(default_factory=set)
    # Archives downloaded completely (every DownloadExport stream that ended OK).
    archives: list[bytes] = field(default_factory=list)


@dataclass
class Ledger:
    apps: dict[str, AppLedger] = field(default_factory=dict)

    def app(self, app_id: str) -> AppLedger:
        return self.apps.setdefault(app_id, AppLedger())

    def acknowledged(
        self, app_id: str, input_id: str, sha256: str, dataset_ids: tuple[str, ...] = ()
    ) -> None:
        entry = self.app(app_id)
        known = entry.inputs.get(input_id)
        if known is not None and known.sha256 != sha256:
            raise AssertionError(f"{app_id}/{input_id} acknowledged twice with other bytes")
        entry.inputs[input_id] = AckedInput(sha256, dataset_ids)

    def attempted(self, app_id: str, sha256: str) -> None:
        """Media sent in a call that ended without an acknowledgement."""
        self.app(app_id).unacknowledged[sha256] += 1

    def version(self, app_id: str, dataset_id: str, version_id: str) -> None:
        self.app(app_id).versions.add((dataset_id, version_id))

    def archive(self, app_id: str, archive: bytes) -> None:
        self.app(app_id).archives.append(archive)


@dataclass
class LedgerReport:
    acknowledged_inputs: int = 0
    unacknowledged_present: int = 0
    objects_read: int = 0
    ready_versions: int = 0
    version_members: int = 0
    exports_checked: int = 0
    archives_checked: int = 0
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.acknowledged_inputs} acknowledged inputs intact, "
            f"{self.unacknowledged_present} unacknowledged but complete, "
            f"{self.objects_read} objects read back, {self.ready_versions} READY versions "
            f"({self.version_members} members), {self.exports_checked} stored exports, "
            f"{self.archives_checked} downloaded archives; {len(self.problems)} problems"
        )


def zip_problem(archive: bytes) -> str | None:
    """None for a complete zip whose every member's CRC checks out."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            bad = opened.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        return f"not a zip ({exc})"
    return None if bad is None else f"member {bad} fails its CRC"


async def _read_object(objects: ObjectStore, key: str) -> bytes | None:
    try:
        return await objects.get(key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            return None
        raise


INPUT_ROWS = """
SELECT i.id, i.media_type, i.blob_key, b.sha256, b.size,
       array_remove(array_agg(di.dataset_id), NULL) AS dataset_ids
FROM inputs i
LEFT JOIN blobs b ON b.key = i.blob_key
LEFT JOIN dataset_inputs di ON (di.app_id, di.input_id) = (i.app_id, i.id)
WHERE i.app_id = $1
GROUP BY i.id, i.media_type, i.blob_key, b.sha256, b.size
"""


async def _check_inputs(
    db: Database, objects: ObjectStore, app_id: str, ledger: AppLedger, report: LedgerReport
) -> None:
    rows = {r["id"]: r for r in await db.fetch(INPUT_ROWS, app_id)}
    problems = report.problems
    for input_id, acked in ledger.inputs.items():
        row = rows.get(input_id)
        if row is None:
            problems.append(f"{app_id}/{input_id}: acknowledged, not in the database")
            continue
        if row["sha256"] != acked.sha256:
            problems.append(
                f"{app_id}/{input_id}: acknowledged with {acked.sha256[:12]}, "
                f"stored as {row['sha256']}"
            )
        missing = set(acked.dataset_ids) - set(row["dataset_ids"])
        if missing:
            problems.append(f"{app_id}/{input_id}: acknowledged in {sorted(missing)}, not a member")
        report.acknowledged_inputs += 1
    # Duplicates: each sha256 at most as often as acknowledged, plus what may have
    # committed without its acknowledgement reaching the client.
    stored = Counter(r["sha256"] for r in rows.values() if r["sha256"] is not None)
    acknowledged = Counter(a.sha256 for a in ledger.inputs.values())
    for sha256, count in stored.items():
        allowed = acknowledged[sha256] + ledger.unacknowledged[sha256]
        if count > allowed:
            what = "never sent" if allowed == 0 else f"sent {allowed} times"
            problems.append(f"{app_id}: {count} inputs with bytes {sha256[:12]}, {what}")
    report.unacknowledged_present += sum(1 for i in rows if i not in ledger.inputs)
    # Every row, acknowledged or not, is whole: a blob row and an object with its bytes.
    for input_id, row in rows.items():
        if row["blob_key"] is None:
            if row["media_type"] != "text":
                problems.append(f"{app_id}/{input_id}: a {row['media_type']} without a blob")
            continue
        if row["sha256"] is None:
            problems.append(f"{app_id}/{input_id}: blob {row['blob_key']} has no blobs row")
            continue
        data = await _read_object(objects, row["blob_key"])
        report.objects_read += 1
        if data is None:
            problems.append(f"{app_id}/{input_id}: object {row['blob_key']} is missing")
        elif hashlib.sha256(data).hexdigest() != row["sha256"] or len(data) != row["size"]:
            problems.append(f"{app_id}/{input_id}: object {row['blob_key']} has other bytes")


VERSIONS = """
SELECT v.dataset_id, v.id, v.status, v.input_count, count(vi.position) AS members
FROM dataset_versions v
LEFT JOIN version_inputs vi
  ON (vi.app_id, vi.dataset_id, vi.version_id) = (v.app_id, v.dataset_id, v.id)
WHERE v.app_id = $1
GROUP BY v.dataset_id, v.id, v.status, v.input_count
"""
# A member's content is the input_contents row its reference names (shared by versions).
MEMBERS = """
SELECT vi.input_id, c.data, vi.content_hash, vi.blob_key, b.size
FROM version_inputs vi
LEFT JOIN input_contents c ON c.hash = vi.content_hash
LEFT JOIN blobs b ON b.key = vi.blob_key
WHERE vi.app_id = $1 AND vi.dataset_id = $2 AND vi.version_id = $3
"""


async def _check_versions(
    db: Database,
    objects: ObjectStore,
    app_id: str,
    ledger: AppLedger,
    report: LedgerReport,
) -> None:
    problems = report.problems
    versions = {(r["dataset_id"], r["id"]): r for r in await db.fetch(VERSIONS, app_id)}
    for dataset_id, version_id in sorted(ledger.versions):
        row = versions.get((dataset_id, version_id))
        if row is None:
            problems.append(f"{app_id}/{dataset_id}/{version_id}: acknowledged, not stored")
    checked_objects: set[str] = set()
    for (dataset_id, version_id), row in sorted(versions.items()):
        name = f"{app_id}/{dataset_id}/{version_id}"
        if row["status"] != "ready":
            # A version commits READY with CreateDatasetVersion or not at all, acknowledged
            # or not: any other status is a partial creation that survived a fault.
            problems.append(f"{name}: {row['status']}; versions are READY when created")
            continue
        report.ready_versions += 1
        if row["input_count"] != row["members"]:
            problems.append(f"{name}: READY with {row['members']} of {row['input_count']} inputs")
        for member in await db.fetch(MEMBERS, app_id, dataset_id, version_id):
            report.version_members += 1
            data = member["data"]
            if data is None or member["content_hash"] != hashlib.sha256(data).digest():
                problems.append(f"{name}/{member['input_id']}: content missing or not its hash")
                continue
            snapshot = input_pb2.Input()
            snapshot.ParseFromString(data)
            if snapshot.id != member["input_id"]:
                problems.append(f"{name}/{member['input_id']}: content is input {snapshot.id!r}")
            key = member["blob_key"]
            if key is None or key in checked_objects:
                continue
            if member["size"] is None:
                problems.append(f"{name}/{member['input_id']}: blob {key} has no blobs row")
            elif not await objects.exists(key):
                problems.append(f"{name}/{member['input_id']}: original {key} is missing")
            checked_objects.add(key)


EXPORTS = """
SELECT e.dataset_id, e.version_id, e.id, e.blob_key, e.size, b.size AS blob_size
FROM exports e LEFT JOIN blobs b ON b.key = e.blob_key
WHERE e.app_id = $1 AND e.status = 'succeeded'
"""


async def _check_exports(
    db: Database, objects: ObjectStore, app_id: str, ledger: AppLedger, report: LedgerReport
) -> None:
    problems = report.problems
    for row in await db.fetch(EXPORTS, app_id):
        name = f"{app_id}/{row['dataset_id']}/{row['version_id']}/exports/{row['id']}"
        report.exports_checked += 1
        if row["blob_key"] is None or row["blob_size"] is None:
            problems.append(f"{name}: succeeded without a stored archive")
            continue
        archive = await _read_object(objects, row["blob_key"])
        if archive is None:
            problems.append(f"{name}: archive {row['blob_key']} is missing")
            continue
        if len(archive) != row["size"]:
            problems.append(f"{name}: {len(archive)} bytes stored, {row['size']} announced")
        problem = zip_problem(archive)
        if problem is not None:
            problems.append(f"{name}: stored archive is {problem}")
    for index, archive in enumerate(ledger.archives):
        report.archives_checked += 1
        problem = zip_problem(archive)
        if problem is not None:
            problems.append(f"{app_id}: downloaded archive #{index} is {problem}")


async def check_ledger(db: Database, objects: ObjectStore, ledger: Ledger) -> LedgerReport:
    """Every rule of the module docstring, for every app in the ledger. Raises an
    AssertionError listing every problem; returns what was checked otherwise."""
    report = LedgerReport()
    for app_id, entry in sorted(ledger.apps.items()):
        await _check_inputs(db, objects, app_id, entry, report)
        await _check_versions(db, objects, app_id, entry, report)
        await _check_exports(db, objects, app_id, entry, report)
    if report.problems:
        shown = "\n  ".join(report.problems[:50])
        raise AssertionError(f"ledger check failed: {report}\n  {shown}")
    return report


@dataclass(frozen=True)
class OrphanReport:
    collected: int
    blobs: int

    def __str__(self) -> str:
        return f"{self.collected} orphans collected, {self.blobs} blobs left, each with its object"


def _unfinished_uploads(objects: ObjectStore, prefix: str) -> list[str]:
    # minio 7 has no public listing of multipart uploads; the object store's own
    # collector relies on the same call.
    client = objects._client
    listing = client._list_multipart_uploads(objects.bucket, prefix=prefix, max_uploads=1000)
    return [u.object_name or "?" for u in listing.uploads]


async def staged_uploads(objects: ObjectStore) -> list[str]:
    """What streamed uploads left in S3: objects under `uploads/`, then unfinished
    multipart uploads there (each name prefixed with "multipart:")."""
    staged = await objects.list_keys(UPLOADS_PREFIX)
    unfinished = await asyncio.to_thread(_unfinished_uploads, objects, UPLOADS_PREFIX)
    return staged + [f"multipart:{name}" for name in unfinished]


async def collect_and_check_orphans(db: Database, objects: ObjectStore) -> OrphanReport:
    """One collection pass with a zero grace period (nothing may be writing), then: every
    `blobs` row is referenced and has its object, every object under `blobs/` has its
    row, and no upload cut off mid-stream left an object or a multipart upload behind."""
    collected = await ContentAddressedBlobStore(db, objects).collect_orphans(
        timedelta(0), limit=1_000_000
    )
    problems = []
    unreferenced = await db.fetch(f"SELECT b.key FROM blobs b WHERE NOT {REFERENCED}")
    if unreferenced:
        problems.append(f"{len(unreferenced)} unreferenced blobs rows, e.g. {unreferenced[0][0]}")
    rows = {r["key"] for r in await db.fetch("SELECT key FROM blobs")}
    stored = set(await objects.list_keys(BLOBS_PREFIX))
    if stored - rows:
        problems.append(f"{len(stored - rows)} objects without a row: {sorted(stored - rows)[:5]}")
    if rows - stored:
        problems.append(f"{len(rows - stored)} rows without an object: {sorted(rows - stored)[:5]}")
    staged = await staged_uploads(objects)
    if staged:
        problems.append(f"{len(staged)} uploads cut off left behind: {staged[:5]}")
    if problems:
        raise AssertionError("orphan check failed:\n  " + "\n  ".join(problems))
    return OrphanReport(collected, len(rows))
