"""The composition root: builds storage, then the domain, then the API, each object once.

Nothing else constructs repositories, use cases or servicer parts; `service.app` runs what
this module builds."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from service.adapters.image_headers import UrlImageHeaders
from service.adapters.url_fetch import UrlFetcher
from service.api.access import AccessRpcs
from service.api.annotations import AnnotationRpcs
from service.api.clarifai.parts import NativeParts, clarifai_parts
from service.api.datasets import DatasetRpcs
from service.api.diffs import DiffRpcs
from service.api.downloads import Downloads
from service.api.exports import ExportRpcs
from service.api.imports import ImportRpcs
from service.api.inputs import InputRpcs
from service.api.links import DownloadLinks
from service.api.membership import MembershipRpcs
from service.api.ontologies import OntologyRpcs
from service.api.pagination import PageTokens
from service.api.projects import ProjectRpcs
from service.api.reencode import ReencodeRpcs
from service.api.search import SearchRpcs
from service.api.search_jobs import SearchJobRpcs
from service.api.versions import VersionRpcs
from service.config import Config
from service.domain.access_admin import AccessAdmin
from service.domain.annotations import AnnotationService
from service.domain.auth import Authenticator
from service.domain.clock import SystemClock
from service.domain.contents import ContentKeeper
from service.domain.datasets import DatasetService, DatasetSettings
from service.domain.diffs import DiffService
from service.domain.embedding_job import EmbeddingIndexer, EmbeddingScheduler, EmbeddingStartup
from service.domain.embeddings import Embedder
from service.domain.exports import ExportBuilder, ExportService, ExportSettings
from service.domain.idempotency import Idempotency
from service.domain.imported import ImportSettings
from service.domain.imports import ImportService
from service.domain.input_drafts import InputSettings
from service.domain.inputs import InputService
from service.domain.jobs import JobHandler, JobKind, JobScheduler
from service.domain.maintenance import Maintenance
from service.domain.membership import MembershipService
from service.domain.ontologies import OntologyService
from service.domain.ontology_check import OntologyGate
from service.domain.projects import ProjectService
from service.domain.reencode import Reencoder, ReencodeService
from service.domain.search import SearchService
from service.domain.search_jobs import AddBySearch, SearchJobService
from service.domain.transfers import InputTransfers, TransferSettings
from service.domain.versions import RetiredBuild, VersionService
from service.formats.archives import Archives, ZipArchiveReader
from service.formats.snapshot import ProtobufContentConcepts, ProtobufSnapshotEncoder
from service.jobs import JobRunner, new_worker_id
from service.media.probe import MediaProbes
from service.media.transcode import FfmpegTranscoder
from service.storage.access import PgCollaboratorRepository, PgUserRepository
from service.storage.annotations import PgAnnotationRepository
from service.storage.api_keys import PgApiKeyRepository
from service.storage.archives import TempFileArchives
from service.storage.audit import PgAuditRepository
from service.storage.blobs import ContentAddressedBlobStore
from service.storage.contents import PgContentRepository
from service.storage.datasets import PgDatasetRepository
from service.storage.db import Database, server_secret
from service.storage.diffs import PgVersionPairs
from service.storage.embeddings import PgEmbeddingRepository
from service.storage.exports import PgExportRepository
from service.storage.idempotency import PgIdempotencyRepository
from service.storage.inputs import PgInputRepository, PgMembershipRepository
from service.storage.jobs import PgJobQueue
from service.storage.objectstore import ObjectStore
from service.storage.ontologies import PgOntologyRepository
from service.storage.projects import PgProjectRepository
from service.storage.reencode import PgReencodeRepository
from service.storage.search import PgSearchRepository
from service.storage.search_jobs import PgSearchJobRepository
from service.storage.versions import PgVersionRepository


@dataclass(frozen=True)
class Storage:
    """One repository per table, and the stores, over one pool and one bucket."""

    db: Database
    blobs: ContentAddressedBlobStore
    keys: PgApiKeyRepository
    datasets: PgDatasetRepository
    inputs: PgInputRepository
    members: PgMembershipRepository
    annotations: PgAnnotationRepository
    versions: PgVersionRepository
    version_pairs: PgVersionPairs
    exports: PgExportRepository
    idempotency: PgIdempotencyRepository
    jobs: PgJobQueue
    ontologies: PgOntologyRepository
    projects: PgProjectRepository
    reencodes: PgReencodeRepository
    embeddings: PgEmbeddingRepository
    search: PgSearchRepository
    search_jobs: PgSearchJobRepository
    users: PgUserRepository
    collaborators: PgCollaboratorRepository
    audit: PgAuditRepository
    contents: PgContentRepository
    # Keeps each input's content up to date (the transaction hook it installs on `db`).
    keeper: ContentKeeper

    @classmethod
    def build(cls, db: Database, objects: ObjectStore) -> Storage:
        blobs = ContentAddressedBlobStore(db, objects)
        inputs, annotations = PgInputRepository(db), PgAnnotationRepository(db)
        contents = PgContentRepository(db)
        keeper = ContentKeeper(contents, inputs, annotations, blobs, ProtobufSnapshotEncoder(), db)
        # Every transaction that changes inputs or annotations commits their content.
        db.content_refresh = keeper.refresh_own
        return cls(
            db=db,
            blobs=blobs,
            keys=PgApiKeyRepository(db),
            datasets=PgDatasetRepository(db),
            inputs=inputs,
            members=PgMembershipRepository(db),
            annotations=annotations,
            versions=PgVersionRepository(db),
            version_pairs=PgVersionPairs(db),
            exports=PgExportRepository(db),
            idempotency=PgIdempotencyRepository(db),
            jobs=PgJobQueue(db),
            ontologies=PgOntologyRepository(db),
            projects=PgProjectRepository(db),
            reencodes=PgReencodeRepository(db),
            embeddings=PgEmbeddingRepository(db),
            search=PgSearchRepository(db),
            search_jobs=PgSearchJobRepository(db),
            users=PgUserRepository(db),
            collaborators=PgCollaboratorRepository(db),
            audit=PgAuditRepository(db),
            contents=contents,
            keeper=keeper,
        )


def job_runner(
    config: Config,
    store: Storage,
    links: DownloadLinks | None = None,
    embedders: Sequence[Embedder] = (),
) -> JobRunner:
    """The runner, with a handler for every kind of job the domain queues; `links` gives
    export archives the HTTP address of the stored originals they reference, `embedders`
    are the installation's models (service.embedders.installation_embedders)."""
    db, blobs = store.db, store.blobs
    handlers: dict[JobKind, JobHandler] = {
        JobKind.BUILD_VERSION: RetiredBuild(store.versions, db),
        JobKind.EXPORT_VERSION: ExportBuilder(
            store.exports, store.versions, Archives(blobs), blobs, db, links=links
        ),
        JobKind.REENCODE_VIDEOS: Reencoder(
            store.inputs,
            store.inputs,
            store.reencodes,
            blobs,
            MediaProbes(),
            FfmpegTranscoder(),
            db,
            max_output_bytes=config.max_upload_bytes,
        ),
        JobKind.EMBED_INPUTS: EmbeddingIndexer(
            store.embeddings,
            tuple(embedders),
            blobs,
            db,
            fetcher=_fetcher(config),
            batch=config.embed_batch,
        ),
        JobKind.ADD_BY_SEARCH: AddBySearch(
            store.search, store.embeddings, store.inputs, store.members, store.search_jobs, db
        ),
    }
    return JobRunner(
        store.jobs,
        handlers,
        worker_id=new_worker_id(),
        lease=config.job_lease,
        concurrency=config.job_concurrency,
        background=frozenset({JobKind.EMBED_INPUTS}),
    )


@dataclass(frozen=True)
class Domain:
    """The use cases, each built once and shared by every RPC that needs it."""

    datasets: DatasetService
    inputs: InputService
    members: MembershipService
    transfers: InputTransfers
    annotations: AnnotationService
    versions: VersionService
    exports: ExportService
    imports: ImportService
    diffs: DiffService
    ontologies: OntologyService
    projects: ProjectService
    reencodes: ReencodeService
    idempotency: Idempotency
    maintenance: Maintenance
    authenticator: Authenticator
    search: SearchService
    search_jobs: SearchJobService
    # Users, collaborators, API keys and the audit log (AccessService).
    access: AccessAdmin
    # Run once at startup: registers the embedding models, queues the backfill.
    embedding_startup: EmbeddingStartup
    # The installation's embedding models (built in, ONNX).
    embedders: tuple[Embedder, ...]

    @classmethod
    def build(
        cls,
        config: Config,
        store: Storage,
        runner: JobRunner,
        links: DownloadLinks | None = None,
        embedders: Sequence[Embedder] = (),
    ) -> Domain:
        """`links`: the HTTP port's links for stored originals (None: presigned URLs)."""
        db, blobs, clock, probes = store.db, store.blobs, SystemClock(), MediaProbes()
        # A job queued by a use case wakes the runner once its transaction commits.
        jobs = JobScheduler(store.jobs, db, runner.notify)
        embedding_jobs = EmbeddingScheduler(
            jobs, frozenset(t for e in embedders for t in e.spec.media_types)
        )
        urls = config.download_url_ttl
        authenticator = Authenticator(
            store.keys,
            clock,
            config.auth_cache_seconds,
            users=store.users,
            collaborators=store.collaborators,
        )
        datasets = DatasetService(
            store.datasets,
            blobs,
            db,
            clock,
            DatasetSettings(config.delete_retention, urls),
            probes,
            collaborators=store.collaborators,
            roles_changed=authenticator.invalidate,
        )
        # The ontologies that labels on inputs of datasets attached to projects must fit.
        gate = OntologyGate(store.projects, store.ontologies)
        inputs = InputService(
            store.inputs,
            store.members,
            blobs,
            db,
            InputSettings(urls),
            probes,
            store.annotations,
            gate,
            fetcher=_fetcher(config),
            image_headers=_image_headers(config),
            links=links,
            embedding_jobs=embedding_jobs,
            embeddings=store.embeddings,
            keeper=store.keeper,
        )
        annotations = AnnotationService(store.annotations, store.members, db, gate)
        versions = VersionService(
            store.versions,
            store.members,
            jobs,
            db,
            store.keeper,
            store.contents,
            store.ontologies,
        )
        search = SearchService(
            store.embeddings,
            store.search,
            store.inputs,
            store.members,
            store.versions,
            db,
            inputs,
            {e.spec.id: e for e in embedders},
        )
        return cls(
            datasets=datasets,
            inputs=inputs,
            members=MembershipService(inputs, store.inputs, store.members, db),
            transfers=InputTransfers(
                inputs, blobs, TransferSettings(config.max_upload_bytes), probes
            ),
            annotations=annotations,
            versions=versions,
            exports=ExportService(
                versions, store.exports, jobs, blobs, blobs, db, clock, ExportSettings(urls)
            ),
            imports=ImportService(
                inputs,
                annotations,
                store.members,
                blobs,
                TempFileArchives(),
                ZipArchiveReader(),
                db,
                ImportSettings(max_archive_bytes=config.max_import_bytes),
                probes,
                gate,
            ),
            diffs=DiffService(
                store.versions, store.members, store.version_pairs, ProtobufContentConcepts(), db
            ),
            reencodes=ReencodeService(store.inputs, store.reencodes, jobs, db),
            ontologies=OntologyService(store.ontologies, db),
            projects=ProjectService(
                store.projects,
                store.ontologies,
                store.datasets,
                db,
                store.annotations,
                store.members,
                gate,
            ),
            idempotency=Idempotency(db, store.idempotency),
            maintenance=Maintenance(
                datasets,
                blobs,
                store.idempotency,
                orphan_grace=config.orphan_grace,
                request_id_ttl=config.request_id_ttl,
                embeddings=store.embeddings,
                captures=store.versions,
                audit=store.audit,
                audit_retention=config.audit_retention,
                keeper=store.keeper,
            ),
            authenticator=authenticator,
            search=search,
            search_jobs=SearchJobService(
                search,
                store.search,
                store.embeddings,
                store.inputs,
                store.members,
                store.search_jobs,
                jobs,
                db,
            ),
            access=AccessAdmin(
                db,
                store.users,
                store.collaborators,
                store.keys,
                store.audit,
                store.datasets,
                clock,
                # This server's cache forgets at once; the others within its time.
                changed=authenticator.invalidate,
            ),
            embedding_startup=EmbeddingStartup(
                store.embeddings, tuple(embedders), embedding_jobs, db
            ),
            embedders=tuple(embedders),
        )


def _fetcher(config: Config) -> UrlFetcher | None:
    if not config.fetch_urls:
        return None
    return _url_fetcher(config)


def _image_headers(config: Config) -> UrlImageHeaders | None:
    if not config.fetch_url_headers:
        return None
    return UrlImageHeaders(_url_fetcher(config))


def _url_fetcher(config: Config) -> UrlFetcher:
    return UrlFetcher(
        max_bytes=config.fetch_max_bytes,
        timeout_seconds=config.fetch_timeout.total_seconds(),
        allowed_networks=[ipaddress.ip_network(n) for n in config.fetch_allowed_networks],
        concurrency=config.fetch_concurrency,
    )


@dataclass(frozen=True)
class Api:
    """The servicer parts of each proto service (`service.api.server` composes them)."""

    datasets: tuple[object, ...]
    inputs: tuple[object, ...]
    annotations: tuple[object, ...]
    versions: tuple[object, ...]
    ontologies: tuple[object, ...]
    projects: tuple[object, ...]
    # SearchService: the search RPCs, and the search jobs' part.
    search: tuple[object, ...]
    access: tuple[object, ...]
    # clarifai.api.V2: parts over the native parts above.
    clarifai: tuple[object, ...]
    # The download routes of the HTTP port (the links' targets).
    downloads: Downloads

    @classmethod
    async def build(cls, domain: Domain, db: Database, links: DownloadLinks) -> Api:
        once = domain.idempotency
        tokens = PageTokens(await server_secret(db, "page_tokens"))
        datasets = DatasetRpcs(domain.datasets, once, tokens)
        membership = MembershipRpcs(
            domain.members, once, tokens, domain.datasets, domain.search_jobs
        )
        inputs = InputRpcs(domain.inputs, once, tokens, domain.transfers, links)
        annotations = AnnotationRpcs(domain.annotations, once, tokens)
        versions = VersionRpcs(domain.versions, domain.exports, once, tokens, links)
        exports = ExportRpcs(domain.exports, once, tokens, links)
        native = NativeParts(datasets, membership, inputs, annotations, versions, exports, links)
        return cls(
            datasets=(datasets, membership, ImportRpcs(domain.imports, once)),
            inputs=(inputs, ReencodeRpcs(domain.reencodes, once)),
            annotations=(annotations,),
            versions=(versions, exports, DiffRpcs(domain.diffs)),
            ontologies=(OntologyRpcs(domain.ontologies, once, tokens),),
            projects=(ProjectRpcs(domain.projects, once, tokens),),
            search=(SearchRpcs(domain.search, tokens), SearchJobRpcs(domain.search_jobs)),
            access=(AccessRpcs(domain.access, once, tokens),),
            clarifai=clarifai_parts(native),
            downloads=Downloads(domain.exports, domain.transfers, domain.authenticator, links),
        )
