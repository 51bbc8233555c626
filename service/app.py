"""Composition root: builds storage, domain and transport, runs and stops them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from service.adapters.url_fetch import UrlFetcher
from service.api.annotations import AnnotationServicer
from service.api.datasets import DatasetServicer
from service.api.diffs import DiffRpcs
from service.api.exports import ExportRpcs
from service.api.imports import ImportRpcs
from service.api.inputs import InputServicer
from service.api.pagination import PageTokens
from service.api.server import SERVICE_NAMES, build_server
from service.api.versions import DatasetVersionServicer
from service.config import Config
from service.domain.annotations import AnnotationService
from service.domain.auth import Authenticator, ensure_bootstrap_key
from service.domain.clock import SystemClock
from service.domain.datasets import DatasetService, DatasetSettings
from service.domain.diffs import DiffService
from service.domain.exports import ExportBuilder, ExportService, ExportSettings
from service.domain.idempotency import Idempotency
from service.domain.imports import ImportService, ImportSettings
from service.domain.inputs import InputService, InputSettings
from service.domain.jobs import JobHandler, JobKind
from service.domain.maintenance import Maintenance
from service.domain.transfers import InputTransfers, TransferSettings
from service.domain.versions import VersionBuilder, VersionService
from service.exports.archives import Archives
from service.exports.decode import ProtobufContentConcepts
from service.exports.encode import ProtobufSnapshotEncoder
from service.exports.readers import ZipArchiveReader
from service.jobs import JobRunner, new_worker_id
from service.storage.annotations import PgAnnotationRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.archives import TempFileArchives
from service.storage.blobs import ContentAddressedBlobStore, ObjectStore
from service.storage.datasets import PgDatasetRepository
from service.storage.db import Database, migrate, server_secret
from service.storage.diffs import PgVersionPairs
from service.storage.embedded import EmbeddedPostgres, EmbeddedS3, EmbeddedServerError
from service.storage.exports import PgExportRepository
from service.storage.idempotency import PgIdempotencyRepository
from service.storage.inputs import PgInputRepository, PgMembershipRepository
from service.storage.jobs import PgJobQueue
from service.storage.versions import PgVersionRepository

log = logging.getLogger("datasetd")

BOOTSTRAP_LOCK_ID = 0x64617461_0002
MAINTENANCE_LOCK_ID = 0x64617461_0003
HEALTH_INTERVAL_SECONDS = 5.0


@dataclass
class Resources:
    """Connections to PostgreSQL and S3, started embedded where not configured."""

    db: Database
    objects: ObjectStore
    embedded: list[EmbeddedPostgres | EmbeddedS3] = field(default_factory=list)

    async def close(self) -> None:
        await self.db.close()
        self.objects.close()
        await _stop_embedded(self.embedded)


async def _database_url(config: Config, embedded: list[EmbeddedPostgres | EmbeddedS3]) -> str:
    if config.database_url:
        return config.database_url
    postgres = EmbeddedPostgres(config.data_dir / "postgres")
    embedded.append(postgres)
    log.info("starting embedded PostgreSQL in %s", postgres.data_dir)
    return await asyncio.to_thread(postgres.start)


async def _object_store(
    config: Config, embedded: list[EmbeddedPostgres | EmbeddedS3]
) -> ObjectStore:
    if config.s3_endpoint:
        return ObjectStore(
            config.s3_endpoint,
            config.s3_access_key,
            config.s3_secret_key,
            config.s3_bucket,
            secure=config.s3_secure,
            region=config.s3_region or None,
        )
    s3 = EmbeddedS3(config.data_dir / "s3", config.s3_bucket)
    embedded.append(s3)
    log.info("starting embedded S3 (SeaweedFS) in %s", config.data_dir / "s3")
    endpoint = await asyncio.to_thread(s3.start)
    return ObjectStore(
        endpoint.endpoint,
        endpoint.access_key,
        endpoint.secret_key,
        endpoint.bucket,
        secure=endpoint.secure,
    )


async def _stop_embedded(embedded: list[EmbeddedPostgres | EmbeddedS3]) -> None:
    # Reverse order of start; each stop waits until its process is gone.
    for process in reversed(embedded):
        await asyncio.to_thread(process.stop)


async def open_resources(config: Config) -> Resources:
    """Connects to PostgreSQL and S3, starting embedded servers for what is not configured.

    The two start concurrently: the embedded S3 server alone takes seconds."""
    embedded: list[EmbeddedPostgres | EmbeddedS3] = []
    try:
        dsn, objects = await asyncio.gather(
            _database_url(config, embedded), _object_store(config, embedded)
        )
        db = await Database.connect(dsn, max_size=config.db_pool_size)
    except BaseException:
        await _stop_embedded(embedded)
        raise
    return Resources(db, objects, embedded)


@asynccontextmanager
async def open_database(config: Config) -> AsyncIterator[Database]:
    """The database alone, for administrative commands."""
    embedded: list[EmbeddedPostgres | EmbeddedS3] = []
    try:
        dsn = await _database_url(config, embedded)
    except EmbeddedServerError as exc:
        # The server is running on this data directory: use its database.
        running = EmbeddedPostgres(config.data_dir / "postgres").running_dsn()
        embedded.clear()
        if running is None:
            raise SystemExit(f"{exc}\nset DATASETD_DATABASE_URL or stop the server") from None
        dsn = running
    db = await Database.connect(dsn, min_size=1, max_size=2)
    try:
        yield db
    finally:
        await db.close()
        await _stop_embedded(embedded)


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    resources: Resources
    bootstrap_secret: str | None
    health_servicer: health.aio.HealthServicer
    tasks: list[asyncio.Task[Any]]
    config: Config
    runner: JobRunner | None = None

    async def stop(self) -> None:
        await self.health_servicer.enter_graceful_shutdown()
        # In-flight calls get the grace period to finish; new ones are refused.
        await self.server.stop(self.config.shutdown_grace.total_seconds())
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.resources.close()


async def start(config: Config, resources: Resources | None = None) -> Running:
    """Starts the server; with `resources` given (tests), uses them instead of opening new ones."""
    resources = resources or await open_resources(config)
    db, objects = resources.db, resources.objects
    try:
        async with db.connection() as conn:
            await migrate(conn)
        await objects.ensure_bucket()
        clock = SystemClock()
        keys = PgApiKeyRepository(db)
        async with db.transaction(), db.connection() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", BOOTSTRAP_LOCK_ID)
            bootstrap_secret = await ensure_bootstrap_key(
                keys, config.bootstrap_app, config.bootstrap_key or None
            )
        blobs = ContentAddressedBlobStore(db, objects)
        idempotency_records = PgIdempotencyRepository(db)
        job_queue = PgJobQueue(db)
        # Services owning a job kind register their handler here, before the runner
        # task starts below (it claims only kinds found in this dict).
        job_handlers: dict[JobKind, JobHandler] = {}
        runner = JobRunner(
            job_queue,
            job_handlers,
            worker_id=new_worker_id(),
            lease=config.job_lease,
            concurrency=config.job_concurrency,
        )
        datasets = DatasetService(
            PgDatasetRepository(db),
            blobs,
            db,
            clock,
            DatasetSettings(config.delete_retention, config.download_url_ttl),
        )
        inputs = InputService(
            PgInputRepository(db),
            PgMembershipRepository(db),
            blobs,
            db,
            InputSettings(config.download_url_ttl),
            fetcher=(
                UrlFetcher(
                    max_bytes=config.fetch_max_bytes,
                    timeout_seconds=config.fetch_timeout.total_seconds(),
                )
                if config.fetch_urls
                else None
            ),
        )
        idempotency = Idempotency(db, idempotency_records)
        tokens = PageTokens(await server_secret(db, "page_tokens"))
        version_records = PgVersionRepository(db)
        job_handlers[JobKind.BUILD_VERSION] = VersionBuilder(
            version_records,
            PgInputRepository(db),
            PgAnnotationRepository(db),
            blobs,
            ProtobufSnapshotEncoder(),
            db,
        )
        versions = VersionService(version_records, PgMembershipRepository(db), job_queue, db)
        export_records = PgExportRepository(db)
        job_handlers[JobKind.EXPORT_VERSION] = ExportBuilder(
            export_records, version_records, Archives(blobs), blobs, db
        )
        exports = ExportService(
            versions,
            export_records,
            job_queue,
            blobs,
            blobs,
            db,
            clock,
            ExportSettings(config.download_url_ttl),
        )
        maintenance = Maintenance(
            datasets,
            blobs,
            idempotency_records,
            orphan_grace=config.orphan_grace,
            request_id_ttl=config.request_id_ttl,
        )
        health_servicer = health.aio.HealthServicer()
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        server = build_server(
            authenticator=Authenticator(keys, clock, config.auth_cache_seconds),
            datasets=DatasetServicer(
                datasets,
                inputs,
                idempotency,
                tokens,
                imports=ImportRpcs(
                    ImportService(
                        inputs,
                        AnnotationService(
                            PgAnnotationRepository(db), PgMembershipRepository(db), db
                        ),
                        PgMembershipRepository(db),
                        blobs,
                        TempFileArchives(),
                        ZipArchiveReader(),
                        db,
                        ImportSettings(max_archive_bytes=config.max_import_bytes),
                    ),
                    idempotency,
                ),
            ),
            inputs=InputServicer(
                inputs,
                idempotency,
                tokens,
                InputTransfers(inputs, blobs, TransferSettings(config.max_upload_bytes)),
            ),
            annotations=AnnotationServicer(
                AnnotationService(PgAnnotationRepository(db), PgMembershipRepository(db), db),
                idempotency,
                tokens,
            ),
            versions=DatasetVersionServicer(
                versions,
                idempotency,
                tokens,
                exports=ExportRpcs(exports, idempotency, tokens, jobs_queued=runner.notify),
                diffs=DiffRpcs(
                    DiffService(
                        version_records,
                        PgMembershipRepository(db),
                        PgVersionPairs(db),
                        ProtobufContentConcepts(),
                        db,
                    )
                ),
                jobs_queued=runner.notify,
            ),
            health_servicer=health_servicer,
            max_message_bytes=config.max_message_bytes,
            max_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        port = server.add_insecure_port(config.listen)
        if port == 0:
            raise RuntimeError(f"cannot listen on {config.listen}")
        await server.start()
    except BaseException:
        await resources.close()
        raise
    tasks = [
        asyncio.create_task(_watch_health(health_servicer, resources), name="health"),
        asyncio.create_task(
            _maintain(maintenance, db, config.maintenance_interval.total_seconds()),
            name="maintenance",
        ),
        asyncio.create_task(runner.run_forever(), name="jobs"),
    ]
    return Running(
        server, port, resources, bootstrap_secret, health_servicer, tasks, config, runner
    )


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, status)


async def _watch_health(servicer: health.aio.HealthServicer, resources: Resources) -> None:
    """SERVING only while the database and the bucket answer."""
    while True:
        try:
            await asyncio.wait_for(
                asyncio.gather(resources.db.ping(), resources.objects.ping()),
                HEALTH_INTERVAL_SECONDS,
            )
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception as exc:
            log.warning("health check failed: %s", exc)
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        await _set_health(servicer, status)
        await asyncio.sleep(HEALTH_INTERVAL_SECONDS)


async def _maintain(maintenance: Maintenance, db: Database, interval: float) -> None:
    while True:
        try:
            async with db.exclusive(MAINTENANCE_LOCK_ID) as mine:
                # One replica at a time; the others skip this round.
                if mine:
                    report = await maintenance.run_once()
                    if any(vars(report).values()):
                        log.info("maintenance: %s", report)
        except Exception:
            log.exception("maintenance round failed; retrying next round")
        await asyncio.sleep(interval)


def banner(config: Config, running: Running) -> str:
    host = config.listen.rsplit(":", 1)[0]
    address = f"{host}:{running.port}"
    key = running.bootstrap_secret
    lines = [f"datasetd is serving on {address} (app {config.bootstrap_app!r})"]
    if key:
        lines.append(f"bootstrap API key for app {config.bootstrap_app!r}: {key}")
        if not config.bootstrap_key:
            lines.append("  (created now and shown only once: store it somewhere safe)")
    else:
        key = "<your key>"
        lines.append(
            "bootstrap API key: shown on first start only; create another with "
            f"`.venv/bin/python -m service keys create --app {config.bootstrap_app}`"
        )
    lines += [
        "try it:",
        f"  .venv/bin/grpcurl -plaintext -H 'authorization: Key {key}' "
        f'-d \'{{"app_id": "{config.bootstrap_app}"}}\' {address} '
        "datasetd.v1.DatasetService/ListDatasets",
        "stop with Ctrl-C",
    ]
    return "\n".join(lines)


async def serve(config: Config) -> None:
    running = await start(config)
    print(banner(config, running), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shutting down: finishing in-flight calls", file=sys.stderr, flush=True)
    await running.stop()
    print("datasetd stopped", file=sys.stderr, flush=True)
