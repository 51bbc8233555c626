"""PostgreSQL search queries (SearchRepository): filters, cosine ranking over pgvector,
counts, the ids of matches, exact and near duplicates.

One statement is composed per call from the conditions the filter sets (values are
parameters; only a model's number and dimension are literals, which the planner needs to
match the model's partial HNSW index `embeddings_hnsw_<number>` on
`(vector::vector(<dimension>)) vector_cosine_ops WHERE model_number = <number> AND
replaced_at IS NULL`, and a page's LIMIT, with which PostgreSQL's generic plan of the
prepared statement keeps the index: a LIMIT parameter gets a plan re-made per call, about
0.4 ms, or a generic one without the index). A page's statement also returns its hits'
inputs as GetInput shows them, with their client vectors, and checks the scope's dataset
and version itself: a page is one round trip.

A ranked search counts its candidates first (bounded; unless the planner estimates them
far above the bound; the answer is reused for FEW_CACHE_SECONDS): at most
EXACT_SCAN_LIMIT are all scored exactly (recall 1, whatever the filter keeps); more walk
the index with pgvector's iterative scan, the filters applied as it goes, and a scan
that runs out before the page is full gives way to the exact page. A version is always
searched exactly, over what it captured (version_inputs, the input_contents they refer to,
version_embeddings).
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
from google.protobuf.message import DecodeError
from pgvector import Vector

from service.domain.embeddings import (
    EXACT_SCAN_LIMIT,
    DuplicateGroup,
    EmbeddingModel,
    GeoBox,
    GeoRadius,
    Ranking,
    SearchCursor,
    SearchFilter,
    SearchHit,
)
from service.domain.models import ClientVector, GeoPoint, Input, MediaType, VersionStatus
from service.domain.search import FoundHit
from service.formats import snapshot
from service.storage.db import HNSW_EF_SEARCH, Connection, Database, Repository
from service.storage.embeddings import from_vector, index_predicate, vector_expression
from service.storage.inputs import _INPUT_COLUMNS, _INPUT_JOINS, row_to_input
from service.storage.rows import stored_blob
from service.wire.inputs import concepts_to_json
from service.wire.struct import struct_to_dict

# Mean earth radius (IUGG), the one the geo filters are documented with.
EARTH_RADIUS_KM = 6371.0088
# Degrees of slack on the bounding-box prefilter of a radius, so that rounding never
# drops a point the great-circle distance keeps.
_BOX_SLACK_DEGREES = 1e-6
# Near-duplicate pairs compare every vector with every other one up to this many vectors,
# through the index above: the exact comparison is quadratic, and at 1,000 vectors of 512
# dimensions it already costs about what 1,000 index scans do (a few ms each).
EXACT_PAIRS_LIMIT = 1_000
# A ranked search whose candidates the planner estimates above this many takes the index
# without counting them (see PgSearchRepository._few).
LARGE_ESTIMATE = 4 * EXACT_SCAN_LIMIT
# pgvector's bounds of hnsw.ef_search; every connection starts at HNSW_EF_SEARCH.
_MIN_EF_SEARCH, _MAX_EF_SEARCH = HNSW_EF_SEARCH, 1000
# How long `_few`'s answer for one query is reused: counting the candidates costs several
# index searches, and a scope's size moves slowly. A stale answer costs speed, not recall:
# the index path falls back to the exact page when its scan runs out.
FEW_CACHE_SECONDS = 10.0
FEW_CACHE_SIZE = 4096


class _Args:
    """The parameters of one statement, numbered as they are added."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def add(self, value: Any, cast: str) -> str:
        self.values.append(value)
        return f"${len(self.values)}::{cast}"


@dataclass(frozen=True)
class _Scope:
    """The rows a filter is about and the expressions of their searchable columns."""

    version: bool
    source: str
    where: tuple[str, ...]
    app: str
    id: str
    seq: str
    media_type: str
    metadata: str
    longitude: str
    latitude: str
    created_at: str


def _live_dataset(app: str, dataset: str) -> str:
    return (
        f"EXISTS (SELECT 1 FROM datasets d WHERE d.app_id = {app} AND d.id = {dataset}"
        " AND d.deleted_at IS NULL)"
    )


def _scope(query: SearchFilter, args: _Args, *, guarded: bool = False) -> _Scope:
    """`guarded`: the rows only while the scope's dataset is live and its version READY
    (one-time conditions, evaluated once per statement), so that a page needs no check of
    its own; an empty page then leaves the caller to tell why."""
    app = args.add(query.app_id, "text")
    if query.dataset_id is not None and query.version_id is not None:
        dataset = args.add(query.dataset_id, "text")
        version = args.add(query.version_id, "text")
        guards: tuple[str, ...] = ()
        if guarded:
            guards = (
                _live_dataset(app, dataset),
                f"EXISTS (SELECT 1 FROM dataset_versions x WHERE x.app_id = {app}"
                f" AND x.dataset_id = {dataset} AND x.id = {version}"
                f" AND x.status = '{VersionStatus.READY.value}')",
            )
        # A deleted input stays in its version: every searched column is the captured one.
        return _Scope(
            version=True,
            source="version_inputs v JOIN input_contents vc ON vc.hash = v.content_hash",
            where=(
                f"v.app_id = {app}",
                f"v.dataset_id = {dataset}",
                f"v.version_id = {version}",
                *guards,
            ),
            app="v.app_id",
            id="v.input_id",
            seq="coalesce(v.input_seq, v.position::bigint)",
            media_type="vc.media_type",
            metadata="vc.metadata",
            longitude="vc.longitude",
            latitude="vc.latitude",
            created_at="vc.created_at",
        )
    where = [f"i.app_id = {app}"]
    source = "inputs i"
    if query.dataset_id is not None:
        source += " JOIN dataset_inputs m ON m.app_id = i.app_id AND m.input_id = i.id"
        dataset = args.add(query.dataset_id, "text")
        where.append(f"m.dataset_id = {dataset}")
        if guarded:
            where.append(_live_dataset(app, dataset))
    return _Scope(
        version=False,
        source=source,
        where=tuple(where),
        app="i.app_id",
        id="i.id",
        seq="i.seq",
        media_type="i.media_type",
        metadata="i.metadata",
        longitude="i.longitude",
        latitude="i.latitude",
        created_at="i.created_at",
    )


def _radius(scope: _Scope, geo: GeoRadius, args: _Args) -> list[str]:
    lat, lon = scope.latitude, scope.longitude
    angle = geo.radius_km / EARTH_RADIUS_KM
    conditions = [f"{lat} IS NOT NULL", f"{lon} IS NOT NULL"]
    # Bounding box first (cheap, and it lets an index on the coordinates help): a point
    # within the radius is at most `angle` away in latitude; in longitude at most
    # asin(sin(angle) / cos(latitude)) while neither pole nor the antimeridian is inside.
    dlat = math.degrees(angle) + _BOX_SLACK_DEGREES
    if geo.latitude - dlat > -90 and geo.latitude + dlat < 90:
        conditions.append(
            f"{lat} BETWEEN {args.add(geo.latitude - dlat, 'float8')}"
            f" AND {args.add(geo.latitude + dlat, 'float8')}"
        )
        ratio = math.sin(angle) / math.cos(math.radians(geo.latitude))
        if angle < math.pi / 2 and ratio < 1:
            dlon = math.degrees(math.asin(ratio)) + _BOX_SLACK_DEGREES
            if geo.longitude - dlon >= -180 and geo.longitude + dlon <= 180:
                conditions.append(
                    f"{lon} BETWEEN {args.add(geo.longitude - dlon, 'float8')}"
                    f" AND {args.add(geo.longitude + dlon, 'float8')}"
                )
    c_lat = args.add(geo.latitude, "float8")
    c_lon = args.add(geo.longitude, "float8")
    # Haversine; least() keeps asin's argument in its domain despite rounding.
    conditions.append(
        f"2 * {EARTH_RADIUS_KM!r} * asin(least(1.0, sqrt("
        f"power(sin(radians({lat} - {c_lat}) / 2), 2)"
        f" + cos(radians({c_lat})) * cos(radians({lat}))"
        f" * power(sin(radians({lon} - {c_lon}) / 2), 2))))"
        f" <= {args.add(geo.radius_km, 'float8')}"
    )
    return conditions


def _box(scope: _Scope, geo: GeoBox, args: _Args) -> list[str]:
    return [
        f"{scope.latitude} BETWEEN {args.add(geo.min_latitude, 'float8')}"
        f" AND {args.add(geo.max_latitude, 'float8')}",
        f"{scope.longitude} BETWEEN {args.add(geo.min_longitude, 'float8')}"
        f" AND {args.add(geo.max_longitude, 'float8')}",
    ]


def _conditions(query: SearchFilter, scope: _Scope, args: _Args) -> list[str]:
    """The filter's conditions on the scope's rows (the scope's own ones included)."""
    where = list(scope.where)
    if scope.version:
        concepts = "coalesce(vc.concepts, '{}'::text[])"
        if query.concept_ids:
            where.append(f"{concepts} @> {args.add(list(query.concept_ids), 'text[]')}")
        if query.negative_concept_ids:
            where.append(
                f"NOT ({concepts} && {args.add(list(query.negative_concept_ids), 'text[]')})"
            )
        if query.annotated is not None:
            where.append(f"coalesce(vc.annotated, false) = {args.add(query.annotated, 'boolean')}")
    else:
        # Input-level concepts and those of regions alike: every annotation's positives.
        if query.concept_ids:
            where.append(
                f"{args.add(list(query.concept_ids), 'text[]')} <@ ARRAY("
                "SELECT unnest(a.positive_concepts) FROM annotations a"
                " WHERE a.app_id = i.app_id AND a.input_id = i.id)"
            )
        if query.negative_concept_ids:
            where.append(
                "NOT EXISTS (SELECT 1 FROM annotations a"
                " WHERE a.app_id = i.app_id AND a.input_id = i.id AND a.positive_concepts && "
                f"{args.add(list(query.negative_concept_ids), 'text[]')})"
            )
        if query.annotated is not None:
            where.append(
                "EXISTS (SELECT 1 FROM annotations a"
                " WHERE a.app_id = i.app_id AND a.input_id = i.id)"
                f" = {args.add(query.annotated, 'boolean')}"
            )
    if query.metadata is not None:
        where.append(f"{scope.metadata} @> {args.add(query.metadata, 'jsonb')}")
    if query.media_types:
        media = [m.value for m in query.media_types]
        where.append(f"{scope.media_type} = ANY({args.add(media, 'text[]')})")
    if isinstance(query.geo, GeoRadius):
        where.extend(_radius(scope, query.geo, args))
    elif isinstance(query.geo, GeoBox):
        where.extend(_box(scope, query.geo, args))
    if query.created_after is not None:
        where.append(f"{scope.created_at} >= {args.add(query.created_after, 'timestamptz')}")
    if query.created_before is not None:
        where.append(f"{scope.created_at} < {args.add(query.created_before, 'timestamptz')}")
    return where


def _vector_join(scope: _Scope, model: EmbeddingModel) -> str:
    """Joins `e`, the row's vector of the model: the current one (the index's predicate,
    literally), or the one the version captured."""
    if scope.version:
        return (
            " JOIN version_embeddings ve ON ve.app_id = v.app_id AND ve.dataset_id = v.dataset_id"
            " AND ve.version_id = v.version_id AND ve.input_id = v.input_id"
            f" JOIN embeddings e ON e.id = ve.embedding_id AND e.model_number = {int(model.number)}"
        )
    return (
        " JOIN embeddings e ON e.app_id = i.app_id AND e.input_id = i.id"
        f" AND {index_predicate(model)}"
    )


def _vector_id(scope: _Scope, model: EmbeddingModel) -> str:
    """The id (embeddings.id) of the row's vector `_vector_join` would join, or NULL."""
    if scope.version:
        return (
            "(SELECT e.id FROM version_embeddings ve JOIN embeddings e"
            f" ON e.id = ve.embedding_id AND e.model_number = {int(model.number)}"
            " WHERE ve.app_id = v.app_id AND ve.dataset_id = v.dataset_id"
            " AND ve.version_id = v.version_id AND ve.input_id = v.input_id LIMIT 1)"
        )
    return (
        "(SELECT e.id FROM embeddings e WHERE e.app_id = i.app_id AND e.input_id = i.id"
        f" AND {index_predicate(model)})"
    )


def _distance(model: EmbeddingModel, vector: str) -> str:
    """Cosine distance of `e`'s vector to `vector`, in the form the HNSW index is on."""
    return f"({vector_expression(model)} <=> {vector})"


def _query_vector(model: EmbeddingModel, vector: Sequence[float], args: _Args) -> str:
    # A real[] parameter cast on the server: no client codec for the vector type needed.
    return f"{args.add([float(x) for x in vector], 'real[]')}::vector({int(model.dimension)})"


@dataclass(frozen=True)
class _Statement:
    """A composed SELECT over the scope's matching rows: `ranked` names the rows with
    `h_app`, `h_id`, `h_seq` and `h_score` (plus the captured columns in a version)."""

    scope: _Scope
    args: _Args
    source: str
    where: list[str]
    score: str
    vector: str


def _statement(
    query: SearchFilter, ranking: Ranking | None, *, scored: bool = True, guarded: bool = False
) -> _Statement:
    """`scored`: whether the statement uses the score (else the query vector, which would
    be a parameter of no known type, is left out; the ranking still requires a vector).
    `guarded`: see `_scope`."""
    args = _Args()
    scope = _scope(query, args, guarded=guarded)
    where = _conditions(query, scope, args)
    source = scope.source
    score = "0.0::float8"
    vector = ""
    if ranking is not None:
        source += _vector_join(scope, ranking.model)
        if scored:
            vector = _query_vector(ranking.model, ranking.vector, args)
            score = f"(1 - {_distance(ranking.model, vector)})"
        if ranking.exclude_input_id is not None:
            where.append(f"{scope.id} <> {args.add(ranking.exclude_input_id, 'text')}")
    return _Statement(scope, args, source, where, score, vector)


def _filters_by_score(ranking: Ranking | None) -> bool:
    return ranking is not None and ranking.min_score is not None


def _min_score(statement: _Statement, ranking: Ranking | None) -> list[str]:
    if ranking is None or ranking.min_score is None:
        return []
    return [f"{statement.score} >= {statement.args.add(ranking.min_score, 'float8')}"]


def _captured_columns(scope: _Scope) -> str:
    if not scope.version:
        return ""
    return (
        ", v.input_seq AS v_input_seq, vc.media_type AS v_media_type, vc.metadata AS v_metadata,"
        " vc.longitude AS v_longitude, vc.latitude AS v_latitude, vc.created_at AS v_created_at,"
        " v.blob_key AS v_blob_key, vc.data AS v_data"
    )


# The current client vectors of input `i` (what GetInput shows in data.embeddings), by
# model id: NULLs when it has none. Sent as pgvector's binary form in a bytea[], which
# reads faster than a vector[] (12 vectors of 512-d: 0.24 against 0.34 ms a fetch here).
_CLIENT_VECTORS = (
    " LEFT JOIN LATERAL (SELECT array_agg(cm.id ORDER BY cm.id) AS cv_models,"
    " array_agg(vector_send(ce.vector) ORDER BY cm.id) AS cv_vectors"
    " FROM embeddings ce JOIN embedding_models cm ON cm.number = ce.model_number"
    " WHERE ce.app_id = i.app_id AND ce.input_id = i.id AND ce.replaced_at IS NULL"
    " AND cm.source = 'client') cv ON true"
)


def _hit_select(scope: _Scope, hits: str, order: str, *, vectors: bool = False) -> str:
    """The hits' inputs as GetInput returns them (in a version, the live input when it
    still exists, else what the version captured of it); with `vectors`, the live
    inputs' client vectors too (`cv_models`, `cv_vectors`)."""
    if not scope.version:
        extra = ", cv.cv_models, cv.cv_vectors" if vectors else ""
        return (
            f"SELECT h.h_seq, h.h_score, {_INPUT_COLUMNS}{extra}"
            f" FROM {hits} h JOIN inputs i ON i.app_id = h.h_app AND i.id = h.h_id"
            f" {_INPUT_JOINS}{_CLIENT_VECTORS if vectors else ''} ORDER BY {order}"
        )
    return (
        f"SELECT h.*, {_INPUT_COLUMNS}, vb.key AS vb_key, vb.sha256 AS vb_sha256,"
        " vb.size AS vb_size, vb.content_type AS vb_content_type"
        f" FROM {hits} h LEFT JOIN inputs i ON i.app_id = h.h_app AND i.id = h.h_id"
        " AND (h.v_input_seq IS NULL OR i.seq = h.v_input_seq)"
        f" {_INPUT_JOINS} LEFT JOIN blobs vb ON vb.key = h.v_blob_key ORDER BY {order}"
    )


def _row_to_hit(row: asyncpg.Record, app_id: str) -> SearchHit:
    stored = row_to_input(row) if row["id"] is not None else None
    hit = stored if "v_data" not in row else _as_captured(row, app_id, stored)
    assert hit is not None
    return SearchHit(hit, float(row["h_score"]), int(row["h_seq"]))


def _row_to_found(row: asyncpg.Record, app_id: str) -> FoundHit:
    hit = _row_to_hit(row, app_id)
    if "cv_models" not in row or row["cv_models"] is None:
        return FoundHit(hit)
    given = zip(row["cv_models"], row["cv_vectors"], strict=True)
    return FoundHit(
        hit, tuple(ClientVector(m, from_vector(Vector.from_binary(v))) for m, v in given)
    )


def _as_captured(row: asyncpg.Record, app_id: str, stored: Input | None) -> Input:
    """A version's member as the version captured it: its id and stored original, the
    content of its snapshot (formats/snapshot.py) or, without one, its captured columns;
    what neither holds (the datasets it is in now) from the live input, if any."""
    geo = None
    if row["v_longitude"] is not None and row["v_latitude"] is not None:
        geo = GeoPoint(row["v_longitude"], row["v_latitude"])
    blob = stored_blob(row, ("vb_key", "vb_sha256", "vb_size", "vb_content_type"))
    captured = replace(
        stored or Input(app_id=app_id, id=row["h_id"], media_type=MediaType.IMAGE),
        media_type=MediaType(row["v_media_type"])
        if row["v_media_type"]
        else (stored.media_type if stored is not None else MediaType.IMAGE),
        blob=blob or (stored.blob if stored is not None else None),
        metadata=row["v_metadata"] or {},
        geo=geo,
        created_at=row["v_created_at"] or (stored.created_at if stored else None),
    )
    if row["v_data"] is None:
        return captured
    try:
        message = snapshot.parse(row["v_data"])
    except DecodeError:
        return captured
    data = message.data
    return replace(
        captured,
        title=message.title,
        text=data.text.raw if data.HasField("text") else captured.text,
        concepts=concepts_to_json(data.concepts),
        metadata=struct_to_dict(data.metadata) if data.HasField("metadata") else {},
    )


def _ef_search(rows: int) -> int:
    return max(_MIN_EF_SEARCH, min(_MAX_EF_SEARCH, 2 * rows))


def _ranked_where(s: _Statement, ranking: Ranking, after: SearchCursor | None) -> list[str]:
    where = s.where + _min_score(s, ranking)
    if after is not None:
        if after.score is None:
            # A cursor of an unranked page: nothing of a ranked order follows it.
            where.append("false")
        else:
            score = s.args.add(after.score, "float8")
            seq = s.args.add(after.seq, "bigint")
            where.append(
                f"({s.score} < {score} OR ({s.score} = {score} AND {s.scope.seq} > {seq}))"
            )
    return where


def nearest_settings(fetch: int) -> list[str]:
    """What a scan for `fetch` rows sets beyond the connection's settings (HNSW_SESSION_
    SETTINGS: strict order, so the scan goes on past ef_search candidates, up to
    hnsw.max_scan_tuples, until the filters let `fetch` rows through, by distance), in a
    transaction: a larger ef_search for larger pages."""
    ef_search = _ef_search(fetch)
    return [] if ef_search <= HNSW_EF_SEARCH else [f"SET LOCAL hnsw.ef_search = {ef_search}"]


def nearest_statement(
    query: SearchFilter,
    ranking: Ranking,
    after: SearchCursor | None,
    fetch: int,
    *,
    vectors: bool = False,
    guarded: bool = False,
) -> tuple[str, list[Any]]:
    """The `fetch` nearest matches through the model's HNSW index (live scopes)."""
    s = _statement(query, ranking, guarded=guarded)
    where = _ranked_where(s, ranking, after)
    where.append(f"e.app_id = {s.args.add(query.app_id, 'text')}")
    hits = (
        f"(SELECT {s.scope.app} AS h_app, {s.scope.id} AS h_id, {s.scope.seq} AS h_seq,"
        f" {s.score} AS h_score FROM {s.source} WHERE {' AND '.join(where)}"
        f" ORDER BY {_distance(ranking.model, s.vector)} LIMIT {int(fetch)})"
    )
    return _hit_select(s.scope, hits, "h.h_score DESC, h.h_seq", vectors=vectors), s.args.values


@dataclass(frozen=True)
class _Page:
    """What one page's statements are asked for (see PgSearchRepository.page)."""

    query: SearchFilter
    vectors: bool
    guarded: bool


class PgSearchRepository(Repository):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        # `_few`'s answers: (query, model number) → (few, when it expires).
        self._few_answers: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    async def search(
        self,
        query: SearchFilter,
        ranking: Ranking | None,
        after: SearchCursor | None,
        limit: int,
    ) -> list[SearchHit]:
        found = await self.page(query, ranking, after, limit, vectors=False, guarded=False)
        return [f.hit for f in found]

    async def page(
        self,
        query: SearchFilter,
        ranking: Ranking | None,
        after: SearchCursor | None,
        limit: int,
        *,
        vectors: bool,
        guarded: bool,
    ) -> list[FoundHit]:
        """`search`, each hit with its input's client vectors when `vectors` (in the same
        statement); `guarded`: nothing unless the scope's dataset is live and its version
        READY (no statement of its own to check them)."""
        if limit < 1:
            return []
        page = _Page(query, vectors, guarded)
        # Each path is one statement but for a large page's SET LOCAL: a transaction only
        # then (the statements of `_few` need no common snapshot).
        async with self._db.connection() as conn:
            if ranking is None:
                return await self._by_seq(conn, page, after, limit)
            if query.version_id is None and not await self._few(conn, query, ranking):
                return await self._nearest(conn, page, ranking, after, limit)
            return await self._exact(conn, page, ranking, after, limit)

    async def _few(self, conn: Connection, query: SearchFilter, ranking: Ranking) -> bool:
        """`_count_few`, remembered for FEW_CACHE_SECONDS per query and model."""
        key = f"{ranking.model.number}:{query!r}"
        now = time.monotonic()
        cached = self._few_answers.get(key)
        if cached is not None and cached[1] > now:
            self._few_answers.move_to_end(key)
            return cached[0]
        few = await self._count_few(conn, query, ranking)
        self._few_answers[key] = (few, now + FEW_CACHE_SECONDS)
        self._few_answers.move_to_end(key)
        while len(self._few_answers) > FEW_CACHE_SIZE:
            self._few_answers.popitem(last=False)
        return few

    async def _count_few(self, conn: Connection, query: SearchFilter, ranking: Ranking) -> bool:
        """Whether the ranked candidates (the filter's inputs with a vector of the model)
        are at most EXACT_SCAN_LIMIT; counts no further than one past it. Counting
        EXACT_SCAN_LIMIT rows costs ~3x an index search, so a planner estimate far above
        the limit is taken as its answer (if the estimate was wrong and the filter keeps
        few, the index scan runs out and `_nearest` falls back to the exact page)."""
        s = _statement(query, ranking, scored=False)
        candidates = f"SELECT 1 FROM {s.source} WHERE {' AND '.join(s.where)}"
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {candidates}", *s.args.values)
        if json.loads(plan)[0]["Plan"]["Plan Rows"] > LARGE_ESTIMATE:
            return False
        bound = s.args.add(EXACT_SCAN_LIMIT + 1, "bigint")
        sql = f"SELECT count(*) FROM ({candidates} LIMIT {bound}) c"
        count: int = await conn.fetchval(sql, *s.args.values)
        return count <= EXACT_SCAN_LIMIT

    async def _by_seq(
        self, conn: Connection, page: _Page, after: SearchCursor | None, limit: int
    ) -> list[FoundHit]:
        s = _statement(page.query, None, guarded=page.guarded)
        where = list(s.where)
        if after is not None:
            where.append(f"{s.scope.seq} > {s.args.add(after.seq, 'bigint')}")
        hits = (
            f"(SELECT {s.scope.app} AS h_app, {s.scope.id} AS h_id, {s.scope.seq} AS h_seq,"
            f" {s.score} AS h_score{_captured_columns(s.scope)}"
            f" FROM {s.source} WHERE {' AND '.join(where)}"
            f" ORDER BY {s.scope.seq} LIMIT {int(limit)})"
        )
        sql = _hit_select(s.scope, hits, "h.h_seq", vectors=page.vectors)
        rows = await conn.fetch(sql, *s.args.values)
        return [_row_to_found(r, page.query.app_id) for r in rows]

    async def _exact(
        self,
        conn: Connection,
        page: _Page,
        ranking: Ranking,
        after: SearchCursor | None,
        limit: int,
    ) -> list[FoundHit]:
        s = _statement(page.query, ranking, guarded=page.guarded)
        where = _ranked_where(s, ranking, after)
        hits = (
            f"(SELECT * FROM (SELECT {s.scope.app} AS h_app, {s.scope.id} AS h_id,"
            f" {s.scope.seq} AS h_seq, {s.score} AS h_score{_captured_columns(s.scope)}"
            f" FROM {s.source} WHERE {' AND '.join(where)}) c"
            f" ORDER BY h_score DESC, h_seq LIMIT {int(limit)})"
        )
        sql = _hit_select(s.scope, hits, "h.h_score DESC, h.h_seq", vectors=page.vectors)
        rows = await conn.fetch(sql, *s.args.values)
        return [_row_to_found(r, page.query.app_id) for r in rows]

    async def _nearest(
        self,
        conn: Connection,
        page: _Page,
        ranking: Ranking,
        after: SearchCursor | None,
        limit: int,
    ) -> list[FoundHit]:
        """Through the model's HNSW index. The index yields rows by distance; the page is
        by score then seq, and distinct distances may round to one score: the rows read
        must reach past the last hit's score, else ties beyond them could be skipped: one
        row more tells, and a tie there (rare) reads further."""
        fetch = limit + 1
        while True:
            rows = await self._nearest_rows(conn, page, ranking, after, fetch)
            if len(rows) < fetch:
                # The scan ran out: the last page, or a filter too selective for the
                # scan's bound (hnsw.max_scan_tuples). The exact page is right in both.
                return await self._exact(conn, page, ranking, after, limit)
            if rows[limit - 1]["h_score"] > rows[-1]["h_score"]:
                return [_row_to_found(r, page.query.app_id) for r in rows[:limit]]
            fetch *= 4

    async def _nearest_rows(
        self,
        conn: Connection,
        page: _Page,
        ranking: Ranking,
        after: SearchCursor | None,
        fetch: int,
    ) -> list[asyncpg.Record]:
        sql, args = nearest_statement(
            page.query, ranking, after, fetch, vectors=page.vectors, guarded=page.guarded
        )
        settings = nearest_settings(fetch)
        if not settings:
            return list(await conn.fetch(sql, *args))
        async with conn.transaction(readonly=True):
            await conn.execute("; ".join(settings))
            return list(await conn.fetch(sql, *args))

    async def count(self, query: SearchFilter, ranking: Ranking | None) -> int:
        s = _statement(query, ranking, scored=_filters_by_score(ranking))
        where = s.where + _min_score(s, ranking)
        count: int = await self._db.fetchval(
            f"SELECT count(*) FROM {s.source} WHERE {' AND '.join(where)}", *s.args.values
        )
        return count

    async def matching_ids(
        self, query: SearchFilter, ranking: Ranking | None, after_seq: int | None, limit: int
    ) -> list[tuple[int, str]]:
        s = _statement(query, ranking, scored=_filters_by_score(ranking))
        where = s.where + _min_score(s, ranking)
        if after_seq is not None:
            where.append(f"{s.scope.seq} > {s.args.add(after_seq, 'bigint')}")
        sql = (
            f"SELECT {s.scope.seq} AS seq, {s.scope.id} AS id FROM {s.source}"
            f" WHERE {' AND '.join(where)} ORDER BY {s.scope.seq}"
            f" LIMIT {s.args.add(limit, 'bigint')}"
        )
        return [(r["seq"], r["id"]) for r in await self._db.fetch(sql, *s.args.values)]

    async def exact_duplicates(self, query: SearchFilter) -> list[DuplicateGroup]:
        """A text groups by its text (md5 of it), other media by their stored original (the
        store is content-addressed: equal bytes, one key); each input is in one group at most.
        A version groups by the original it captured; texts are the live inputs' (a text
        never changes; a deleted input has none)."""
        s = _statement(query, None)
        source = s.source
        if s.scope.version:
            source += (
                " LEFT JOIN inputs i ON i.app_id = v.app_id AND i.id = v.input_id"
                " AND (v.input_seq IS NULL OR i.seq = v.input_seq)"
            )
            blob = "v.blob_key"
        else:
            blob = "i.blob_key"
        sql = (
            f"WITH scoped AS (SELECT {s.scope.id} AS id, {s.scope.seq} AS seq,"
            f" coalesce('text:' || md5(i.text_raw), 'blob:' || {blob}) AS content"
            f" FROM {source} WHERE {' AND '.join(s.where)})"
            " SELECT array_agg(id ORDER BY seq) AS ids FROM scoped WHERE content IS NOT NULL"
            " GROUP BY content HAVING count(*) > 1 ORDER BY min(seq)"
        )
        return [
            DuplicateGroup(tuple(r["ids"]), exact=True, min_similarity=1.0)
            for r in await self._db.fetch(sql, *s.args.values)
        ]

    async def similar_pairs(
        self, query: SearchFilter, model: EmbeddingModel, threshold: float, neighbours: int
    ) -> tuple[list[tuple[str, str, float]], int, int]:
        """Pairs by similarity (highest first), each (older input, newer input) by seq.
        Exact up to EXACT_PAIRS_LIMIT inputs with a vector; through the index above (a
        version's vectors replaced since its capture are not in the index: a pair of two
        such is missed, a pair with one is found from its side)."""
        async with self._db.read_transaction(), self._db.connection() as conn:
            s = _statement(query, None)
            rows = await conn.fetch(
                f"SELECT {s.scope.id} AS id, {s.scope.seq} AS seq,"
                f" {_vector_id(s.scope, model)} AS embedding"
                f" FROM {s.source} WHERE {' AND '.join(s.where)}",
                *s.args.values,
            )
            embedded = [r for r in rows if r["embedding"] is not None]
            found: list[asyncpg.Record] = []
            if len(embedded) > 1 and neighbours > 0:
                exact = len(embedded) <= EXACT_PAIRS_LIMIT
                if not exact:
                    for setting in nearest_settings(neighbours):
                        await conn.execute(setting)
                found = await conn.fetch(
                    _exact_pairs(model) if exact else _nearest_pairs(model),
                    [r["embedding"] for r in embedded],
                    [r["seq"] for r in embedded],
                    neighbours,
                    threshold,
                )
        seqs = {r["id"]: r["seq"] for r in embedded}
        pairs: dict[tuple[str, str], float] = {}
        for r in found:
            first, second = sorted((r["a"], r["b"]), key=seqs.__getitem__)
            pairs.setdefault((first, second), float(r["similarity"]))
        ordered = sorted(pairs.items(), key=lambda p: (-p[1], seqs[p[0][0]], seqs[p[0][1]]))
        return [(a, b, sim) for (a, b), sim in ordered], len(rows), len(rows) - len(embedded)


# $1 the scope's vectors (embeddings.id), $2 their inputs' seq, $3 neighbours, $4 threshold.
def _exact_pairs(model: EmbeddingModel) -> str:
    return (
        "WITH scoped AS MATERIALIZED ("
        f" SELECT e.id, e.input_id, t.seq, {vector_expression(model)} AS vector"
        " FROM unnest($1::bigint[], $2::bigint[]) AS t(id, seq) JOIN embeddings e ON e.id = t.id)"
        " SELECT a.input_id AS a, n.input_id AS b, n.similarity FROM scoped a"
        " CROSS JOIN LATERAL (SELECT b.input_id, 1 - (b.vector <=> a.vector) AS similarity"
        " FROM scoped b WHERE b.id <> a.id ORDER BY b.vector <=> a.vector, b.seq LIMIT $3) n"
        " WHERE n.similarity >= $4::float8"
    )


def _nearest_pairs(model: EmbeddingModel) -> str:
    """Each vector's nearest through the index, kept to the scope's (a hashed `= ANY`) as
    the iterative scan goes. $2 is unused here but keeps the parameters of _exact_pairs."""
    near, far = vector_expression(model, "e"), vector_expression(model, "a")
    return (
        "SELECT a.input_id AS a, n.input_id AS b, n.similarity"
        " FROM embeddings a JOIN unnest($1::bigint[], $2::bigint[]) AS t(id, seq) ON a.id = t.id"
        f" CROSS JOIN LATERAL (SELECT e.input_id, 1 - ({near} <=> {far}) AS similarity"
        f" FROM embeddings e WHERE {index_predicate(model, 'e')} AND e.id = ANY($1::bigint[])"
        f" AND e.id <> a.id ORDER BY {near} <=> {far} LIMIT $3) n"
        " WHERE n.similarity >= $4::float8"
    )
