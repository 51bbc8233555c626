"""The process: opens PostgreSQL and S3 (embedded where not configured), starts the server
that `service.wiring` builds, watches its health, and stops it all in order.

With DATASETD_WORKERS above 1 this is one worker process of several (`serve_worker`, started
by service.supervisor, which runs the embedded stack): every worker serves both ports
(SO_REUSEPORT); worker 0 alone runs the job runner and the maintenance loop, so that they run
once per installation as with one process (jobs queued through another worker wake it by a
PostgreSQL NOTIFY when they commit: storage/jobs.py listen_for_jobs)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from service.api.access_policy import InputDatasets
from service.api.clarifai.rest import add_rest_routes
from service.api.clarifai.service import V2Handlers
from service.api.downloads import Downloads, add_download_routes
from service.api.http import HttpServer, build_application, http_address
from service.api.links import DownloadLinks
from service.api.server import LIVENESS_SERVICE, SERVICE_NAMES, build_server
from service.api.tls import ServerTls, load_server_tls
from service.banner import banner_text
from service.config import Config, ConfigError
from service.devstack import EmbeddedPostgres, EmbeddedS3, EmbeddedServerError
from service.domain.auth import Authenticator, ensure_bootstrap_key
from service.domain.jobs import JobKind
from service.domain.maintenance import Maintenance
from service.domain.ports import AuditRepository
from service.embedders import installation_embedders
from service.jobs import JobRunner
from service.observability import metrics, tracing
from service.observability.metrics import InstanceMetrics, QueuedJobs
from service.storage.db import Database, migrate, server_secret
from service.storage.jobs import listen_for_jobs
from service.storage.objectstore import ObjectStore
from service.wiring import Api, Domain, Storage, job_runner

log = logging.getLogger("datasetd")

# The HTTP header naming the process (pid) that answered, under a supervisor.
WORKER_HEADER = "X-Datasetd-Worker-Pid"
# Where the workers' prometheus_client values live (prometheus_client's own variable: it
# switches the library to shared-memory values at import).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

BOOTSTRAP_LOCK_ID = 0x64617461_0002
MAINTENANCE_LOCK_ID = 0x64617461_0003
HEALTH_INTERVAL_SECONDS = 5.0
# The shortest time between two checks: an outage that calls run into triggers a check at
# once, and a failed check is repeated this often, so that health follows PostgreSQL or the
# store within about this long of a change instead of a whole interval.
HEALTH_RETRY_SECONDS = 1.0
# How long a step of the shutdown may take beyond the grace period of in-flight calls.
STOP_STEP_SECONDS = 15.0
# How often the job queue gauges are sampled (one aggregate query over pending jobs).
JOB_SAMPLE_SECONDS = 5.0
_QUEUED_JOBS = """
SELECT kind, count(*) AS queued,
       COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8 AS oldest
FROM jobs WHERE status = 'pending' GROUP BY kind
"""


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
        address = (config.s3_endpoint, config.s3_access_key, config.s3_secret_key)
        bucket, secure, region = config.s3_bucket, config.s3_secure, config.s3_region or None
    else:
        s3 = EmbeddedS3(config.data_dir / "s3", config.s3_bucket)
        embedded.append(s3)
        log.info("starting embedded S3 (SeaweedFS) in %s", config.data_dir / "s3")
        started = await asyncio.to_thread(s3.start)
        address = (started.endpoint, started.access_key, started.secret_key)
        bucket, secure, region = started.bucket, started.secure, None
    timeout = config.s3_timeout.total_seconds()
    return ObjectStore(*address, bucket, secure=secure, region=region, timeout=timeout)


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
        if config.database_read_url:
            # Closed with db.
            await db.attach_replica(
                config.database_read_url,
                max_lag=config.read_max_lag.total_seconds(),
                max_size=config.db_pool_size,
            )
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
    # The HTTP port (metrics, health); 0 and None with DATASETD_HTTP_LISTEN=off.
    http_port: int = 0
    http: HttpServer | None = None
    metrics: InstanceMetrics | None = None

    async def stop(self) -> None:
        await self.health_servicer.enter_graceful_shutdown()
        # In-flight calls get the grace period to finish; new ones are refused.
        grace = self.config.shutdown_grace.total_seconds()
        stopped = asyncio.ensure_future(self.server.stop(grace))
        await _finish("the gRPC server", [stopped], grace + STOP_STEP_SECONDS)
        if self.http is not None:
            http_stopped = asyncio.ensure_future(self.http.stop())
            await _finish("the HTTP server", [http_stopped], STOP_STEP_SECONDS)
        for task in self.tasks:
            task.cancel()
        await _finish("the background tasks", self.tasks, STOP_STEP_SECONDS)
        await self.resources.close()


async def _finish(what: str, tasks: list[asyncio.Task[Any]], seconds: float) -> None:
    """Waits for a step of the shutdown. One that hangs must not keep the process (and
    the embedded servers) alive forever: it is logged, with where every task still
    waits, and the shutdown goes on."""
    done, pending = await asyncio.wait(tasks, timeout=seconds)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("shutdown: %s failed", what, exc_info=task.exception())
    if pending:
        waiting = [
            _where(task) for task in asyncio.all_tasks() if task is not asyncio.current_task()
        ]
        log.error(
            "shutdown: %s did not stop within %.0fs; going on. Tasks:\n%s",
            what,
            seconds,
            "\n".join(waiting),
        )


def _where(task: asyncio.Task[Any]) -> str:
    """Where a task waits, one line per frame. Task.print_stack cannot be used: it reads
    source lines, and fails on the frames of compiled code (grpc's Cython has no line
    numbers)."""
    lines = [f"{task.get_name()}: {task.get_coro()!r}"]
    for frame in task.get_stack():
        code = frame.f_code
        lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
    return "\n".join(lines)


async def start(
    config: Config, resources: Resources | None = None, *, worker: int | None = None
) -> Running:
    """Starts the server; with `resources` given (tests), uses them instead of opening new ones.
    `worker`: this process's index among DATASETD_WORKERS processes sharing the ports (None:
    the only one); only worker 0 runs the job runner, the maintenance loop and the start-up
    embedding work."""
    leader = worker is None or worker == 0
    # Before anything is opened: a bad ONNX model stops the start with its ConfigError.
    embedders = await asyncio.to_thread(installation_embedders, config)
    tls = load_server_tls(config)
    resources = resources or await open_resources(config)
    db = resources.db
    try:
        async with db.connection() as conn:
            await migrate(conn)
        await db.reload_types()
        await resources.objects.ensure_bucket()
        store = Storage.build(db, resources.objects)
        bootstrap_secret = await _bootstrap_key(config, store)
        # Before the domain: export archives name the stored originals under its address.
        links = DownloadLinks(
            await server_secret(db, "download_links"),
            config.download_url_ttl,
            base_url=config.public_url,
            public=bool(config.public_url),
        )
        runner = job_runner(config, store, links, embedders)
        domain = Domain.build(config, store, runner, links, embedders)
        if leader:
            # Registers the models (a changed fingerprint re-embeds) and queues the backfill.
            await domain.embedding_startup.run()
        api = await Api.build(domain, db, links)
        health_servicer = health.aio.HealthServicer()
        await _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        # The V2 methods, shared by the gRPC port and the REST gateway of the HTTP port.
        v2 = V2Handlers(api.clarifai)
        server = build_server(
            authenticator=domain.authenticator,
            datasets=api.datasets,
            inputs=api.inputs,
            annotations=api.annotations,
            versions=api.versions,
            ontologies=api.ontologies,
            projects=api.projects,
            search=api.search,
            access=api.access,
            clarifai=v2,
            health_servicer=health_servicer,
            max_message_bytes=config.max_message_bytes,
            max_concurrent_rpcs=config.max_concurrent_rpcs,
            audit=store.audit,
            input_datasets=store.members,
            reuse_port=worker is not None,
        )
        port = (
            server.add_secure_port(config.listen, tls.grpc_credentials())
            if tls is not None
            else server.add_insecure_port(config.listen)
        )
        if port == 0:
            raise RuntimeError(f"cannot listen on {config.listen}")
        if worker is not None:
            # It joins ports the other workers serve: no NOT_SERVING answer from it until
            # its first check (a lone server may say so while it starts).
            await _check_health(health_servicer, resources)
        instance = InstanceMetrics(kind.value for kind in JobKind)
        instance.watch_pool("primary", db.pool)
        if db.replica is not None:
            instance.watch_pool("read", db.replica.pool)
        await server.start()
        try:
            http = await _start_http(
                config,
                instance,
                health_servicer,
                api.downloads,
                v2,
                domain.authenticator,
                tls,
                audit=store.audit,
                inputs=store.members,
                worker=worker,
            )
            if http is not None and not links.public:
                scheme = "https" if tls is not None else "http"
                links.base_url = f"{scheme}://{http_address(config.http_listen, http.port)}"
        except BaseException:
            await server.stop(None)
            raise
    except BaseException:
        await resources.close()
        raise
    tasks = [
        asyncio.create_task(_watch_health(health_servicer, resources), name="health"),
        asyncio.create_task(_sample_jobs(db, instance, JOB_SAMPLE_SECONDS), name="job-metrics"),
    ]
    if leader:
        tasks += [
            asyncio.create_task(
                _maintain(domain.maintenance, db, config.maintenance_interval.total_seconds()),
                name="maintenance",
            ),
            asyncio.create_task(runner.run_forever(), name="jobs"),
            # Jobs queued by other workers and replicas wake the runner when they commit.
            asyncio.create_task(listen_for_jobs(db, runner.notify), name="job-notifications"),
        ]
    return Running(
        server,
        port,
        resources,
        bootstrap_secret,
        health_servicer,
        tasks,
        config,
        runner,
        http_port=http.port if http is not None else 0,
        http=http,
        metrics=instance,
    )


async def _start_http(
    config: Config,
    instance: InstanceMetrics,
    servicer: health.aio.HealthServicer,
    downloads: Downloads,
    v2: V2Handlers,
    authenticator: Authenticator,
    tls: ServerTls | None = None,
    audit: AuditRepository | None = None,
    inputs: InputDatasets | None = None,
    worker: int | None = None,
) -> HttpServer | None:
    """The HTTP port: /metrics, /healthz, the download links and Clarifai's REST API
    (None when DATASETD_HTTP_LISTEN is off), over TLS when `tls` is given; shared with the
    other workers when `worker` is given."""
    if config.http_listen == "off":
        return None

    async def serving() -> bool:
        # The overall status ("") is always set, so Check never needs the context it
        # would abort an unknown service name on.
        response = await servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    app = build_application(_exposition(instance, worker), serving)
    add_download_routes(app, downloads)
    add_rest_routes(app, v2, authenticator, config.max_message_bytes, audit, inputs)
    if worker is not None:
        app.on_response_prepare.append(_worker_header)
    return await HttpServer.start(
        app,
        config.http_listen,
        tls.ssl_context() if tls is not None else None,
        reuse_port=worker is not None,
    )


async def _worker_header(request: web.Request, response: web.StreamResponse) -> None:
    # Which of the processes sharing the port answered: for the operator and the tests.
    response.headers[WORKER_HEADER] = str(os.getpid())


def _exposition(instance: InstanceMetrics, worker: int | None) -> Callable[[], bytes]:
    """The /metrics text. Under a supervisor (PROMETHEUS_MULTIPROC_DIR set by it), the
    counters and histograms of every worker, past ones included, summed from the shared
    directory: a scrape reaches one worker, and must not see only its share. The gauges of
    `instance` (connection pools) stay this worker's; the job queue is the installation's."""
    directory = os.environ.get(MULTIPROC_ENV)
    if worker is None or not directory:
        return lambda: metrics.exposition(instance)
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, directory)  # type: ignore[no-untyped-call]
    return lambda: generate_latest(registry) + generate_latest(instance.registry)


async def _sample_jobs(db: Database, instance: InstanceMetrics, interval: float) -> None:
    """Samples the job queue for its gauges. On a connection of its own, outside any span:
    a background query every few seconds is not worth a trace."""
    while True:
        try:
            async with db.acquire() as conn:
                rows = await conn.fetch(_QUEUED_JOBS)
            instance.set_job_queue(
                {row["kind"]: QueuedJobs(row["queued"], row["oldest"]) for row in rows}
            )
        except Exception as exc:
            log.debug("job queue sample failed: %s", exc)
        await asyncio.sleep(interval)


async def _bootstrap_key(config: Config, store: Storage) -> str | None:
    """The bootstrap key's secret when this start created it; one replica at a time."""
    async with store.db.transaction(), store.db.connection() as conn:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", BOOTSTRAP_LOCK_ID)
        return await ensure_bootstrap_key(
            store.keys, store.users, config.bootstrap_app, config.bootstrap_key or None
        )


async def _set_health(servicer: health.aio.HealthServicer, status: int) -> None:
    for name in ("", *SERVICE_NAMES):
        await servicer.set(name, status)


async def _watch_health(servicer: health.aio.HealthServicer, resources: Resources) -> None:
    """SERVING only while the database and the bucket answer. Checked every
    HEALTH_INTERVAL_SECONDS while serving; sooner when a call found either unreachable,
    and every HEALTH_RETRY_SECONDS until both answer again."""
    outage = (resources.db.unreachable, resources.objects.unreachable)
    while True:
        for event in outage:
            event.clear()
        status = await _check_health(servicer, resources)
        await asyncio.sleep(HEALTH_RETRY_SECONDS)
        if status == health_pb2.HealthCheckResponse.SERVING:
            await _first_of(outage, HEALTH_INTERVAL_SECONDS - HEALTH_RETRY_SECONDS)


async def _check_health(servicer: health.aio.HealthServicer, resources: Resources) -> int:
    """One check of PostgreSQL and the bucket, its outcome set as the status."""
    try:
        await asyncio.wait_for(
            asyncio.gather(resources.db.ping(), resources.objects.ping()),
            HEALTH_INTERVAL_SECONDS,
        )
        status: int = health_pb2.HealthCheckResponse.SERVING
    except Exception as exc:
        log.warning("health check failed: %s", exc)
        status = health_pb2.HealthCheckResponse.NOT_SERVING
    await _set_health(servicer, status)
    return status


async def _first_of(events: tuple[asyncio.Event, ...], seconds: float) -> None:
    """Returns once any of `events` is set, or after `seconds`."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


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
    return banner_text(
        config,
        running.port,
        running.http_port if running.http is not None else None,
        running.bootstrap_secret,
    )


async def serve(config: Config) -> None:
    # Process-wide (tests start servers in-process and configure tracing themselves).
    tracing.configure_from_env()
    try:
        running = await start(config)
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    print(banner(config, running), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("shutting down: finishing in-flight calls", file=sys.stderr, flush=True)
    await running.stop()
    # Flushes the spans still batched.
    await asyncio.to_thread(tracing.shutdown)
    print("datasetd stopped", file=sys.stderr, flush=True)


async def serve_worker(config: Config, index: int, ready_fd: int) -> None:
    """One worker process under service.supervisor: serves until SIGTERM/SIGINT, or until
    its standard input (a pipe only the supervisor holds) ends: the supervisor is gone, and
    with it the embedded stack. Writes one JSON line to `ready_fd` once it serves."""
    tracing.configure_from_env()
    try:
        running = await start(config, worker=index)
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    ready = {
        "pid": os.getpid(),
        "port": running.port,
        "http_port": running.http_port if running.http is not None else None,
        "bootstrap_secret": running.bootstrap_secret,
    }
    os.write(ready_fd, json.dumps(ready).encode() + b"\n")
    os.close(ready_fd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def lifeline() -> None:
        try:
            alive = bool(os.read(sys.stdin.fileno(), 4096))
        except OSError:
            alive = False
        if not alive:
            loop.remove_reader(sys.stdin.fileno())
            log.error("the supervisor is gone; stopping")
            stop.set()

    loop.add_reader(sys.stdin.fileno(), lifeline)
    await stop.wait()
    await running.stop()
    await asyncio.to_thread(tracing.shutdown)
