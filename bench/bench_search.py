"""Search at scale: kNN through SearchInputs beside the raw pgvector query, recall@10
against exact search, with and without a selective filter, and AddDatasetInputs by search.

Starts the embedded stack and the real server (`python -m service serve`, built-in
embedders off so that no background embedding competes for the CPU), then:

1. loads N text inputs (default 100,000; BENCH_SEARCH_N) with a 512-d vector each of a
   client model, through the API: CreateInputs with `data.embeddings`, batches of 128,
   4 calls in flight. The vectors are a Gaussian mixture (1,000 clusters, unit length),
   closer to real embeddings than uniform noise; `metadata.bucket` is the input's number
   mod 100, so the filter `{"bucket": 7}` keeps 1% of the inputs;
2. waits for the model's HNSW index, `embeddings_hnsw_<number>` (the server builds it),
   or builds it with the expression of storage/search.py after a grace period (said so);
3. interleaved, query by query (the order alternating), BENCH_SEARCH_QUERIES queries
   (default 200; a dataset vector plus noise each): top-10 through SearchInputs, and the
   raw pgvector query on the same table and index through asyncpg
   (`ORDER BY vector::vector(512) <=> $1 LIMIT 10` with the partial index's predicate);
   p50/p99 of each, the ratio of p50s, and recall@10 of both against numpy brute force;
4. the same with the 1% metadata filter (raw: the same ORDER BY joined to inputs with
   `metadata @> $2`, pgvector's iterative scan on, as the server's index path sets it);
5. AddDatasetInputs by search of all N inputs (a background job above 10,000 matches:
   from the call to GetSearchJob DONE) beside a raw `INSERT INTO dataset_inputs ...
   SELECT` of the same rows into another dataset, before and after it.

Targets (issue 11): SearchInputs p50 at most 1.5x the raw query's at recall@10 at least
0.95; with the 1% filter, recall@10 at least 0.9.

    .venv/bin/python -m bench.bench_search                      # 100k: ~10-20 minutes
    BENCH_SEARCH_N=10000 .venv/bin/python -m bench.bench_search  # ~2 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any, Final

import asyncpg
import grpc
import numpy as np
from datasetd.v1 import (
    common_pb2,
    data_pb2,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    input_pb2,
    input_service_pb2,
    input_service_pb2_grpc,
    search_pb2,
    search_service_pb2,
    search_service_pb2_grpc,
)
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import (
    APP_ID,
    announce_serving,
    drive,
    environment,
    install_sigterm_handler,
    keep_session,
    load_average,
    percentile,
    stack_and_server,
)
from service.storage.db import HNSW_SESSION_SETTINGS

DIMENSION: Final = 512
MODEL: Final = "bench-clip"
BATCH: Final = 128
CONCURRENCY: Final = 4
K: Final = 10
CLUSTERS: Final = 1000
# Seconds to wait for the server to build the model's index before building it here.
INDEX_GRACE_SECONDS: Final = 120.0
BUCKETS: Final = 100
FILTER_BUCKET: Final = 7
WARM_UP: Final = 20


def input_id(number: int) -> str:
    return f"in-{number:07d}"


def number_of(input_id_: str) -> int:
    return int(input_id_.removeprefix("in-"))


def unit(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    normalized: np.ndarray[Any, Any] = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(
        np.float32
    )
    return normalized


def mixture(count: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """Unit vectors around CLUSTERS centres (spread 0.5 of a centre's norm)."""
    centres = rng.standard_normal((CLUSTERS, DIMENSION)).astype(np.float32)
    vectors = np.empty((count, DIMENSION), dtype=np.float32)
    for start in range(0, count, 10_000):
        stop = min(start + 10_000, count)
        picks = rng.integers(0, CLUSTERS, stop - start)
        noise = rng.standard_normal((stop - start, DIMENSION)).astype(np.float32)
        vectors[start:stop] = centres[picks] + 0.5 * noise
    return unit(vectors)


def queries_near(
    vectors: np.ndarray[Any, Any], count: int, rng: np.random.Generator
) -> np.ndarray[Any, Any]:
    """Dataset vectors moved by noise: queries with near neighbours, none an exact copy."""
    picks = rng.integers(0, len(vectors), count)
    noise = rng.standard_normal((count, DIMENSION)).astype(np.float32)
    return unit(vectors[picks] + 0.02 * noise)


def exact_top(
    vectors: np.ndarray[Any, Any], query: np.ndarray[Any, Any], allowed: np.ndarray[Any, Any] | None
) -> set[int]:
    scores = vectors @ query
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    top = np.argpartition(-scores, K)[:K]
    return {int(i) for i in top}


# --- loading ----------------------------------------------------------------


async def load(channel: grpc.aio.Channel, metadata: Any, vectors: np.ndarray[Any, Any]) -> float:
    """Inputs per second of the CreateInputs calls that load the vectors."""
    stub: Any = input_service_pb2_grpc.InputServiceStub(channel)
    count = len(vectors)
    batches = iter(range(0, count, BATCH))

    def batch(start: int) -> list[input_pb2.Input]:
        made = []
        for number in range(start, min(start + BATCH, count)):
            labels = struct_pb2.Struct()
            labels.update({"bucket": number % BUCKETS})
            made.append(
                input_pb2.Input(
                    id=input_id(number),
                    data=data_pb2.Data(
                        text=data_pb2.Text(raw=f"text {number}"),
                        metadata=labels,
                        embeddings=[
                            data_pb2.Embedding(model_id=MODEL, vector=vectors[number].tolist())
                        ],
                    ),
                )
            )
        return made

    async def call(worker: int) -> None:
        start = next(batches, None)
        if start is None:
            return
        response = await stub.CreateInputs(
            input_service_pb2.CreateInputsRequest(app_id=APP_ID, inputs=batch(start)),
            metadata=metadata,
            timeout=300,
        )
        assert response.created_count == min(BATCH, count - start), response.results[:3]

    calls = (count + BATCH - 1) // BATCH
    seconds, _ = await drive(call, calls, CONCURRENCY, max_seconds=7200)
    return count / seconds


async def model_number(conn: asyncpg.Connection[asyncpg.Record]) -> int:
    number = await conn.fetchval(
        "SELECT number FROM embedding_models WHERE app_id = $1 AND id = $2", APP_ID, MODEL
    )
    assert number is not None, f"the server has no model {MODEL!r} after the load"
    return int(number)


INDEX_STATE = """
SELECT x.indisvalid FROM pg_class c JOIN pg_index x ON x.indexrelid = c.oid
WHERE c.relname = $1
"""


async def wait_for_index(conn: asyncpg.Connection[asyncpg.Record], number: int) -> str:
    """How the index came to be: built by the server, or here after the grace period."""
    name = f"embeddings_hnsw_{number}"
    started = time.monotonic()
    # An index that exists but is not valid yet is being built (CONCURRENTLY): wait for it
    # past the grace period rather than race it.
    while (valid := await conn.fetchval(INDEX_STATE, name)) is not None or (
        time.monotonic() - started < INDEX_GRACE_SECONDS
    ):
        if valid:
            return f"built by the server (ready {time.monotonic() - started:.0f}s after the load)"
        await asyncio.sleep(1.0)
    began = time.monotonic()
    await conn.execute(
        f"CREATE INDEX {name} ON embeddings USING hnsw ((vector::vector({DIMENSION}))"
        f" vector_cosine_ops) WHERE model_number = {number} AND replaced_at IS NULL"
    )
    return (
        f"NOT built by the server within {INDEX_GRACE_SECONDS:.0f}s: built here in "
        f"{time.monotonic() - began:.0f}s with storage/search.py's expression"
    )


# --- kNN: SearchInputs and the raw query, interleaved --------------------------


def raw_statement(number: int, filtered: bool) -> str:
    order = f"e.vector::vector({DIMENSION}) <=> $1::real[]::vector({DIMENSION})"
    if not filtered:
        return (
            f"SELECT e.input_id FROM embeddings e WHERE e.model_number = {number}"
            f" AND e.replaced_at IS NULL ORDER BY {order} LIMIT {K}"
        )
    return (
        "SELECT e.input_id FROM embeddings e JOIN inputs i ON i.app_id = e.app_id"
        f" AND i.id = e.input_id WHERE e.model_number = {number} AND e.replaced_at IS NULL"
        f" AND i.metadata @> $2::jsonb ORDER BY {order} LIMIT {K}"
    )


async def _hnsw_settings(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    await conn.execute(HNSW_SESSION_SETTINGS)


class Knn:
    def __init__(
        self, channel: grpc.aio.Channel, metadata: Any, pool: asyncpg.Pool[asyncpg.Record]
    ):
        self.stub: Any = search_service_pb2_grpc.SearchServiceStub(channel)
        self.health: Any = health_pb2_grpc.HealthStub(channel)
        self.metadata = metadata
        self.pool = pool

    async def empty(self) -> float:
        """The floor of any call on this channel and server: the health check (no key, no
        database, an empty answer)."""
        began = time.perf_counter()
        await self.health.Check(health_pb2.HealthCheckRequest(), timeout=60)
        return time.perf_counter() - began

    async def served(self, query: np.ndarray[Any, Any], filtered: bool) -> tuple[float, set[int]]:
        search = search_pb2.SearchQuery(
            rank=search_pb2.Rank(
                vector=search_pb2.QueryVector(values=query.tolist()), model_id=MODEL
            )
        )
        if filtered:
            search.metadata.update({"bucket": FILTER_BUCKET})
        request = search_service_pb2.SearchInputsRequest(app_id=APP_ID, query=search, page_size=K)
        began = time.perf_counter()
        response = await self.stub.SearchInputs(request, metadata=self.metadata, timeout=60)
        seconds = time.perf_counter() - began
        return seconds, {number_of(hit.input.id) for hit in response.hits}

    async def unranked(self, filtered: bool) -> float:
        """The same call without a rank: a page of K hits in creation order, each input
        with its vector, decoded and encoded as a ranked page is (the RPC's fixed cost)."""
        search = search_pb2.SearchQuery()
        if filtered:
            search.metadata.update({"bucket": FILTER_BUCKET})
        request = search_service_pb2.SearchInputsRequest(app_id=APP_ID, query=search, page_size=K)
        began = time.perf_counter()
        await self.stub.SearchInputs(request, metadata=self.metadata, timeout=60)
        return time.perf_counter() - began

    async def raw(
        self, statement: str, query: np.ndarray[Any, Any], filtered: bool
    ) -> tuple[float, set[int]]:
        args: list[Any] = [query.tolist()]
        if filtered:
            args.append(f'{{"bucket": {FILTER_BUCKET}}}')
        began = time.perf_counter()
        async with self.pool.acquire() as conn:
            # Strict-order iterative scan (the pool's settings): as the server's index
            # path, it goes on scanning until K rows pass a filter.
            rows = await conn.fetch(statement, *args)
        seconds = time.perf_counter() - began
        return seconds, {number_of(row["input_id"]) for row in rows}


async def knn(
    knn_: Knn,
    number: int,
    vectors: np.ndarray[Any, Any],
    queries: np.ndarray[Any, Any],
    filtered: bool,
) -> dict[str, float]:
    statement = raw_statement(number, filtered)
    allowed = (np.arange(len(vectors)) % BUCKETS == FILTER_BUCKET) if filtered else None
    for query in queries[:WARM_UP]:
        await knn_.served(query, filtered)
        await knn_.raw(statement, query, filtered)
    served_times: list[float] = []
    raw_times: list[float] = []
    unranked_times: list[float] = []
    empty_times: list[float] = []
    served_recall: list[float] = []
    raw_recall: list[float] = []
    for index, query in enumerate(queries[WARM_UP:]):
        truth = exact_top(vectors, query, allowed)
        order = (
            ("served", "raw", "unranked", "empty")
            if index % 2 == 0
            else ("empty", "raw", "unranked", "served")
        )
        for which in order:
            if which == "empty":
                empty_times.append(await knn_.empty())
                continue
            if which == "unranked":
                unranked_times.append(await knn_.unranked(filtered))
                continue
            if which == "served":
                seconds, found = await knn_.served(query, filtered)
                served_times.append(seconds)
                served_recall.append(len(found & truth) / K)
            else:
                seconds, found = await knn_.raw(statement, query, filtered)
                raw_times.append(seconds)
                raw_recall.append(len(found & truth) / K)
    served_times.sort()
    raw_times.sort()
    unranked_times.sort()
    empty_times.sort()
    return {
        "empty_p50_ms": percentile(empty_times, 0.5) * 1000,
        "unranked_p50_ms": percentile(unranked_times, 0.5) * 1000,
        "served_p50_ms": percentile(served_times, 0.5) * 1000,
        "served_p99_ms": percentile(served_times, 0.99) * 1000,
        "raw_p50_ms": percentile(raw_times, 0.5) * 1000,
        "raw_p99_ms": percentile(raw_times, 0.99) * 1000,
        "ratio_p50": percentile(served_times, 0.5) / percentile(raw_times, 0.5),
        "served_recall": statistics.fmean(served_recall),
        "raw_recall": statistics.fmean(raw_recall),
    }


# --- AddDatasetInputs by search ------------------------------------------------


async def create_dataset(stub: Any, metadata: Any, dataset_id: str) -> None:
    await stub.CreateDataset(
        dataset_service_pb2.CreateDatasetRequest(
            app_id=APP_ID, dataset=dataset_pb2.Dataset(id=dataset_id)
        ),
        metadata=metadata,
    )


async def raw_insert(pool: asyncpg.Pool[asyncpg.Record], dataset_id: str) -> float:
    began = time.perf_counter()
    async with pool.acquire() as conn:
        status = await conn.execute(
            "INSERT INTO dataset_inputs (app_id, dataset_id, input_id)"
            " SELECT app_id, $2, id FROM inputs WHERE app_id = $1 AND media_type = 'text'"
            " ORDER BY seq ON CONFLICT DO NOTHING",
            APP_ID,
            dataset_id,
        )
    seconds = time.perf_counter() - began
    inserted = int(status.split()[-1])
    return inserted / seconds


async def add_by_search(
    channel: grpc.aio.Channel, metadata: Any, dataset_id: str, count: int
) -> tuple[float, str]:
    """Inputs per second, from the call until the job is DONE (or the call returned)."""
    datasets: Any = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    search: Any = search_service_pb2_grpc.SearchServiceStub(channel)
    began = time.perf_counter()
    response = await datasets.AddDatasetInputs(
        dataset_service_pb2.AddDatasetInputsRequest(
            app_id=APP_ID,
            dataset_id=dataset_id,
            search=search_pb2.SearchQuery(media_types=[common_pb2.MEDIA_TYPE_TEXT]),
        ),
        metadata=metadata,
        timeout=3600,
    )
    assert response.matched_count == count, response
    how = "in the call"
    if response.job_id:
        how = f"by job {response.job_id}"
        delay = 0.05
        while True:
            job = (
                await search.GetSearchJob(
                    search_service_pb2.GetSearchJobRequest(app_id=APP_ID, job_id=response.job_id),
                    metadata=metadata,
                )
            ).job
            if job.state == search_pb2.SEARCH_JOB_STATE_DONE:
                assert job.added_count == count, job
                break
            assert job.state != search_pb2.SEARCH_JOB_STATE_FAILED, job.error
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
    else:
        assert response.added_count == count, response
    return count / (time.perf_counter() - began), how


# --- the run ---------------------------------------------------------------------


async def run(count: int, query_count: int) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    print(f"making {count:,} vectors of {DIMENSION} dimensions ...", flush=True)
    vectors = mixture(count, rng)
    queries = queries_near(vectors, query_count + WARM_UP, rng)
    figures: dict[str, Any] = {}
    os.environ["DATASETD_BUILTIN_EMBEDDERS"] = "off"
    with stack_and_server(time.monotonic()) as running:
        server = running.server
        async with grpc.aio.insecure_channel(
            server.address, options=[("grpc.max_send_message_length", 64 * 2**20)]
        ) as channel:
            await announce_serving(channel, server)
            metadata = (("authorization", f"Key {server.key}"),)
            print(f"loading {count:,} inputs through CreateInputs ...", flush=True)
            figures["load_per_second"] = await load(channel, metadata, vectors)
            print(f"  {figures['load_per_second']:,.0f} inputs/s", flush=True)
            # The raw queries run with the server's HNSW settings (ef_search, strict
            # order): the same recall, so that the ratio compares the same work.
            pool: asyncpg.Pool[asyncpg.Record] = await asyncpg.create_pool(
                running.info.dsn,
                min_size=1,
                max_size=2,
                init=_hnsw_settings,
                reset=keep_session,  # asyncpg's default RESET ALL would drop them
            )
            try:
                conn = await asyncpg.connect(running.info.dsn)
                try:
                    number = await model_number(conn)
                    print(f"waiting for the HNSW index of model {number} ...", flush=True)
                    figures["index"] = await wait_for_index(conn, number)
                    await conn.execute("VACUUM ANALYZE embeddings")
                    await conn.execute("ANALYZE inputs")
                finally:
                    await conn.close()
                print(f"  index {figures['index']}", flush=True)
                knn_ = Knn(channel, metadata, pool)
                for filtered in (False, True):
                    label = "filtered" if filtered else "plain"
                    print(f"kNN top-{K}, {label}: {query_count} queries each way ...", flush=True)
                    figures[label] = await knn(knn_, number, vectors, queries, filtered)
                datasets: Any = dataset_service_pb2_grpc.DatasetServiceStub(channel)
                for name in ("raw-before", "by-search", "raw-after"):
                    await create_dataset(datasets, metadata, name)
                print("AddDatasetInputs by search of every input ...", flush=True)
                figures["raw_before"] = await raw_insert(pool, "raw-before")
                figures["add_per_second"], figures["add_how"] = await add_by_search(
                    channel, metadata, "by-search", count
                )
                figures["raw_after"] = await raw_insert(pool, "raw-after")
            finally:
                await pool.close()
    return figures


def report(count: int, query_count: int, figures: dict[str, Any]) -> None:
    print(
        f"\n{count:,} inputs, {DIMENSION}-d vectors of a client model; "
        f"{query_count} queries, interleaved; loaded at {figures['load_per_second']:,.0f} "
        f"inputs/s (CreateInputs, {BATCH} per call, {CONCURRENCY} in flight)"
    )
    print(f"HNSW index: {figures['index']}")
    header = (
        f"{'kNN top-10':<26}{'served p50':>11}{'p99':>9}{'raw p50':>10}{'p99':>9}"
        f"{'ratio p50':>11}{'recall served':>15}{'recall raw':>12}"
    )
    print(header)
    for label, title in (("plain", "whole app"), ("filtered", "metadata filter, 1%")):
        f = figures[label]
        print(
            f"{title:<26}{f['served_p50_ms']:>9.2f}ms{f['served_p99_ms']:>7.2f}ms"
            f"{f['raw_p50_ms']:>8.2f}ms{f['raw_p99_ms']:>7.2f}ms{f['ratio_p50']:>11.2f}"
            f"{f['served_recall']:>15.3f}{f['raw_recall']:>12.3f}"
        )
    fixed = figures["plain"]["unranked_p50_ms"], figures["filtered"]["unranked_p50_ms"]
    print(
        f"  (the same SearchInputs without a rank, the RPC's fixed cost, p50: {fixed[0]:.2f}ms "
        f"whole app, {fixed[1]:.2f}ms filtered)"
    )
    empty = figures["plain"]["empty_p50_ms"]
    floor = (empty + figures["plain"]["raw_p50_ms"]) / figures["plain"]["raw_p50_ms"]
    print(
        f"  (an empty call, the health check on the same channel, p50: {empty:.2f}ms; that "
        f"plus the raw query is {floor:.2f}x the raw query: the floor of any served search)"
    )
    raw_add = statistics.fmean((figures["raw_before"], figures["raw_after"]))
    print(
        f"AddDatasetInputs by search, {count:,} matches ({figures['add_how']}): "
        f"{figures['add_per_second']:,.0f} inputs/s; raw INSERT ... SELECT "
        f"{figures['raw_before']:,.0f} and {figures['raw_after']:,.0f} inputs/s "
        f"(ratio {figures['add_per_second'] / raw_add:.2f})"
    )
    plain, filtered = figures["plain"], figures["filtered"]
    print("targets:")
    print(
        f"  p50 <= 1.5x raw at recall >= 0.95: {plain['ratio_p50']:.2f}x at "
        f"{plain['served_recall']:.3f} -> "
        f"{'met' if plain['ratio_p50'] <= 1.5 and plain['served_recall'] >= 0.95 else 'NOT met'}"
    )
    print(
        f"  filtered recall >= 0.9: {filtered['served_recall']:.3f} -> "
        f"{'met' if filtered['served_recall'] >= 0.9 else 'NOT met'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    install_sigterm_handler()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    count = int(os.environ.get("BENCH_SEARCH_N", "100000"))
    query_count = int(os.environ.get("BENCH_SEARCH_QUERIES", "200"))
    if count < 1000 or query_count < 1:
        parser.error("BENCH_SEARCH_N must be at least 1000 and BENCH_SEARCH_QUERIES at least 1")
    load = load_average()
    figures = asyncio.run(run(count, query_count))
    print(f"environment: {environment(load)}")
    report(count, query_count, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
