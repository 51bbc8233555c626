"""The cost of authorization: GetDataset calls/s with the access rules on, beside a server
with them off, and ListAuditEvents over 1M audit events.

Starts the embedded stack and two servers on it (`python -m service serve` as usual, and
the same server with the access rules switched off, `--serve-unchecked` below), then:

1. makes a dataset, a user who is its Viewer (with a personal key, made through the
   repositories as the CLI's bootstrap path makes keys: a personal key is made over the
   API by its own user only) and a read key bound to the dataset (CreateApiKey);
2. BENCH_AUTH_ROUNDS (default 12) interleaved rounds, the order rotating each round:
   GetDataset of the dataset for BENCH_AUTH_SECONDS (default 1.5) each, CONCURRENCY calls
   in flight, with (a) the app owner's personal key (the bootstrap key), (b) the Viewer's
   personal key, (c) the dataset-scoped read key, and (d) the owner's key on the server
   with the rules off (checked first: the read key asking for another dataset is refused
   by one server, NOT_FOUND on the other); calls/s and server CPU per call, and their
   ratios to (d) in the same round, medians over the rounds; and the CPU of the rule
   check alone (`Call.admit`) per principal, timed in the bench process, beside the server
   CPU of a call (under a loaded machine the calls/s vary more than the check costs);
3. inserts 1,000,000 audit events into the app with one `INSERT ... SELECT` over
   generate_series (100 datasets, 50 users, newest last), ANALYZE, then interleaved
   ListAuditEvents first pages (the server's default page size) of the whole app, of one
   dataset (1% of the events) and of one user (2%): p50 and p99, beside the raw
   statement on the same indexes (asyncpg, `ORDER BY id DESC LIMIT <page>`).

Target (issue 12): the checks cost at most 10% of GetDataset calls/s.

"Rules off": the interceptor's per-message rule check (`interceptors.Call.admit`: the rule's
fields, `require`, the audit event of the call) is replaced by the identity in that server
process only; authentication (the same cached Principal) and everything else is unchanged.

    .venv/bin/python -m bench.bench_auth          # ~2-3 minutes (`make bench-auth`)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import asyncpg
import grpc
from datasetd.v1 import (
    access_pb2,
    access_service_pb2,
    access_service_pb2_grpc,
    dataset_pb2,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
)

from bench.common import (
    APP_ID,
    REPO_ROOT,
    ServerProcess,
    _die_with_parent,
    announce_serving,
    drive,
    environment,
    install_sigterm_handler,
    load_average,
    percentile,
    process_cpu,
    stack_and_server,
)

DATASET: Final = "bench-ds"
VIEWER: Final = "bench-viewer"
CONCURRENCY: Final = 8
# BENCH_AUTH_EVENTS overrides it (a quick look at the bench itself).
AUDIT_ROWS: Final = int(os.environ.get("BENCH_AUTH_EVENTS", "1000000"))
AUDIT_DATASETS: Final = 100
AUDIT_USERS: Final = 50
AUDIT_CALLS: Final = 40
TARGET: Final = 0.10

Call = Callable[[], Awaitable[Any]]


# --- the server with the rules off ---------------------------------------------------------


def serve_unchecked() -> int:
    """`python -m service serve` with the access rules off, in this process only."""
    from service.api import interceptors
    from service.cli.main import main as cli_main

    def admit_unchecked(self: interceptors.Call, request: Any) -> Any:
        return request

    if not callable(getattr(interceptors.Call, "admit", None)):
        raise SystemExit("interceptors.Call.admit (the per-message rule check) is gone")
    # Bench only: a server a user starts has no way to turn the rules off.
    interceptors.Call.admit = admit_unchecked  # type: ignore[method-assign]
    return cli_main(["serve"])


class UncheckedServer(ServerProcess):
    """A second server on the same stack and bootstrap key, with the rules off."""

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bench.bench_auth", "--serve-unchecked"],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),  # noqa: PLW1509 (only calls prctl)
            )


# --- setting up the principals ------------------------------------------------------------


def _metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Key {secret}"),)


async def principals(channel: grpc.aio.Channel, owner: str, dsn: str) -> dict[str, str]:
    """The secrets of the owner, the Viewer and the dataset's read key."""
    datasets: Any = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    access: Any = access_service_pb2_grpc.AccessServiceStub(channel)
    as_owner = _metadata(owner)
    await datasets.CreateDataset(
        dataset_service_pb2.CreateDatasetRequest(
            app_id=APP_ID, dataset=dataset_pb2.Dataset(id=DATASET, description="bench")
        ),
        metadata=as_owner,
    )
    await access.CreateUser(
        access_service_pb2.CreateUserRequest(
            app_id=APP_ID,
            user=access_pb2.User(id=VIEWER, display_name="Viewer", role=access_pb2.APP_ROLE_MEMBER),
        ),
        metadata=as_owner,
    )
    await access.AddCollaborator(
        access_service_pb2.AddCollaboratorRequest(
            app_id=APP_ID,
            dataset_id=DATASET,
            collaborator=access_pb2.Collaborator(
                user_id=VIEWER, role=access_pb2.DATASET_ROLE_VIEWER
            ),
        ),
        metadata=as_owner,
    )
    scoped = await access.CreateApiKey(
        access_service_pb2.CreateApiKeyRequest(
            app_id=APP_ID,
            api_key=access_pb2.ApiKey(
                kind=access_pb2.KEY_KIND_SCOPED,
                access=access_pb2.KEY_ACCESS_READ,
                dataset_ids=[DATASET],
                description="bench read key",
            ),
        ),
        metadata=as_owner,
    )
    return {"owner": owner, "viewer": await viewer_key(dsn), "scoped": scoped.secret}


async def viewer_key(dsn: str) -> str:
    from service.domain.auth import new_key
    from service.domain.models import KeyKind
    from service.storage.api_keys import PgApiKeyRepository
    from service.storage.db import Database

    db = await Database.connect(dsn, min_size=1, max_size=1)
    try:
        secret, key = new_key(APP_ID, f"personal key of {VIEWER}")
        await PgApiKeyRepository(db).insert(
            dataclasses.replace(key, kind=KeyKind.PERSONAL, user_id=VIEWER)
        )
    finally:
        await db.close()
    return secret


async def rules_are_off(checked: Any, baseline: Any, scoped: str) -> None:
    """The read key bound to DATASET asks for another dataset: refused by the rules
    (PERMISSION_DENIED), NOT_FOUND from the server without them."""
    request = dataset_service_pb2.GetDatasetRequest(app_id=APP_ID, dataset_id="not-bound")
    for stub, expected in (
        (checked, grpc.StatusCode.PERMISSION_DENIED),
        (baseline, grpc.StatusCode.NOT_FOUND),
    ):
        try:
            await stub.GetDataset(request, metadata=_metadata(scoped))
        except grpc.aio.AioRpcError as error:
            if error.code() != expected:
                raise RuntimeError(f"expected {expected.name}, got {error.code().name}") from None
        else:
            raise RuntimeError(f"expected {expected.name}, got OK")


# --- GetDataset --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    title: str
    stub: Any
    secret: str
    pid: int


@dataclasses.dataclass
class Measured:
    per_second: list[float] = dataclasses.field(default_factory=list)
    cpu_us: list[float] = dataclasses.field(default_factory=list)


async def measure(variant: Variant, seconds: float) -> tuple[float, float]:
    """Calls/s and server CPU microseconds per call over `seconds`."""
    request = dataset_service_pb2.GetDatasetRequest(app_id=APP_ID, dataset_id=DATASET)
    metadata = _metadata(variant.secret)

    async def op(worker: int) -> None:
        await variant.stub.GetDataset(request, metadata=metadata)

    cpu = process_cpu(variant.pid)
    wall, latencies = await drive(op, 1, CONCURRENCY, seconds + 5, min_seconds=seconds)
    used = process_cpu(variant.pid) - cpu
    return len(latencies) / wall, used / len(latencies) * 1e6


async def get_dataset(variants: Sequence[Variant], rounds: int, seconds: float) -> dict[str, Any]:
    print("warming up ...", flush=True)
    for variant in variants:
        await measure(variant, 1.0)
    results = {variant.name: Measured() for variant in variants}
    for round_ in range(rounds):
        shift = round_ % len(variants)
        order = [*variants[shift:], *variants[:shift]]
        for variant in order:
            per_second, cpu_us = await measure(variant, seconds)
            results[variant.name].per_second.append(per_second)
            results[variant.name].cpu_us.append(cpu_us)
        print(
            f"  round {round_ + 1}/{rounds}: "
            + ", ".join(f"{v.name} {results[v.name].per_second[-1]:,.0f}/s" for v in variants),
            flush=True,
        )
    off = results["off"]
    # Paired within each round (the same minute of the machine's load), then the median.
    return {
        name: {
            "per_second": statistics.median(m.per_second),
            "cpu_us": statistics.median(m.cpu_us),
            "ratio": statistics.median(
                a / b for a, b in zip(m.per_second, off.per_second, strict=True)
            ),
            "cpu_ratio": statistics.median(
                a / b for a, b in zip(m.cpu_us, off.cpu_us, strict=True)
            ),
        }
        for name, m in results.items()
    }


# --- the rule check alone ------------------------------------------------------------------

CHECKS: Final = 20_000
GET_DATASET: Final = "/datasetd.v1.DatasetService/GetDataset"


async def check_cost(dsn: str, secrets_: dict[str, str]) -> dict[str, float]:
    """Microseconds of CPU the interceptor's rule check (`Call.admit`) of a GetDataset
    costs each principal, in this process: the per-call `Call` built with and without
    the check, best of 5 runs of CHECKS. Under a loaded machine the calls/s above vary
    more than this whole cost."""
    from service.api import interceptors
    from service.domain.auth import Authenticator
    from service.domain.clock import SystemClock
    from service.observability import REQUEST_ID
    from service.storage.access import PgCollaboratorRepository, PgUserRepository
    from service.storage.api_keys import PgApiKeyRepository
    from service.storage.db import Database

    db = await Database.connect(dsn, min_size=1, max_size=2)
    try:
        authenticator = Authenticator(
            PgApiKeyRepository(db),
            SystemClock(),
            600.0,
            users=PgUserRepository(db),
            collaborators=PgCollaboratorRepository(db),
        )
        request = dataset_service_pb2.GetDatasetRequest(app_id=APP_ID, dataset_id=DATASET)
        REQUEST_ID.set("bench")
        costs: dict[str, float] = {}
        for name, secret in secrets_.items():
            interceptors.PRINCIPAL.set(await authenticator.authenticate(secret))

            def without() -> None:
                interceptors.Call(authenticator, GET_DATASET, ())

            def checked() -> None:
                interceptors.Call(authenticator, GET_DATASET, ()).admit(request)

            checked()  # refused here would raise: every principal may read the dataset
            best = {without: float("inf"), checked: float("inf")}
            for _ in range(5):
                for one in (without, checked):
                    began = time.process_time()
                    for _ in range(CHECKS):
                        one()
                    best[one] = min(best[one], time.process_time() - began)
            costs[name] = max(0.0, best[checked] - best[without]) / CHECKS * 1e6
    finally:
        await db.close()
    return costs


# --- ListAuditEvents ----------------------------------------------------------------------

# Events 1..N, newest last, one every 6 s back from now (about 69 days, inside the 90-day
# retention); event g names dataset ds-(g % 100) (the benchmark's dataset for 7) and user
# user-(g % 50) (the Viewer for 7); one in 20 is a refusal.
_INSERT_AUDIT = f"""
INSERT INTO audit_events
    (at, app_id, user_id, key_id, rpc, dataset_ids, resource_ids, request_id, outcome)
SELECT now() - make_interval(secs => ({AUDIT_ROWS} - g) * 6.0),
       $1,
       CASE WHEN g % {AUDIT_USERS} = 7 THEN '{VIEWER}' ELSE 'user-' || (g % {AUDIT_USERS}) END,
       'key-' || (g % 200),
       '/datasetd.v1.InputService/'
           || (ARRAY['CreateInputs', 'PatchInputs', 'DeleteInputs', 'GetInput'])[1 + g % 4],
       ARRAY[CASE WHEN g % {AUDIT_DATASETS} = 7 THEN '{DATASET}'
                  ELSE 'ds-' || (g % {AUDIT_DATASETS}) END],
       ARRAY['in-' || g],
       'req-' || g,
       CASE WHEN g % 20 = 0 THEN 'PERMISSION_DENIED' ELSE 'OK' END
FROM generate_series(1, {AUDIT_ROWS}) AS g
ORDER BY g
"""
_RAW = {
    "app": "SELECT * FROM audit_events WHERE app_id = $1 ORDER BY id DESC LIMIT $2",
    "dataset": (
        "SELECT * FROM audit_events WHERE app_id = $1 AND dataset_ids @> ARRAY[$3]::text[] "
        "ORDER BY id DESC LIMIT $2"
    ),
    "user": (
        "SELECT * FROM audit_events WHERE app_id = $1 AND user_id = $3 ORDER BY id DESC LIMIT $2"
    ),
}


async def insert_audit(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        began = time.perf_counter()
        await conn.execute(_INSERT_AUDIT, APP_ID, timeout=1800)
        await conn.execute("VACUUM ANALYZE audit_events", timeout=1800)
        return time.perf_counter() - began
    finally:
        await conn.close()


async def list_audit(channel: grpc.aio.Channel, owner: str, dsn: str) -> dict[str, Any]:
    stub: Any = access_service_pb2_grpc.AccessServiceStub(channel)
    metadata = _metadata(owner)
    cases = {
        "app": access_service_pb2.ListAuditEventsRequest(app_id=APP_ID),
        "dataset": access_service_pb2.ListAuditEventsRequest(app_id=APP_ID, dataset_id=DATASET),
        "user": access_service_pb2.ListAuditEventsRequest(app_id=APP_ID, user_id=VIEWER),
    }
    conn = await asyncpg.connect(dsn)
    try:
        first = await stub.ListAuditEvents(cases["app"], metadata=metadata)
        page = len(first.events)
        arguments = {
            "app": (APP_ID, page),
            "dataset": (APP_ID, page, DATASET),
            "user": (APP_ID, page, VIEWER),
        }
        served: dict[str, list[float]] = {name: [] for name in cases}
        raw: dict[str, list[float]] = {name: [] for name in cases}
        counts: dict[str, int] = {}
        for index in range(AUDIT_CALLS + 3):
            for name, request in cases.items():
                began = time.perf_counter()
                response = await stub.ListAuditEvents(request, metadata=metadata)
                took = time.perf_counter() - began
                began = time.perf_counter()
                rows = await conn.fetch(_RAW[name], *arguments[name])
                raw_took = time.perf_counter() - began
                counts[name] = len(response.events)
                assert len(rows) == len(response.events), (name, len(rows), counts[name])
                if index >= 3:  # warm-up
                    served[name].append(took)
                    raw[name].append(raw_took)
    finally:
        await conn.close()
    return {
        name: {
            "events": counts[name],
            "p50_ms": percentile(sorted(served[name]), 0.5) * 1000,
            "p99_ms": percentile(sorted(served[name]), 0.99) * 1000,
            "raw_p50_ms": percentile(sorted(raw[name]), 0.5) * 1000,
        }
        for name in cases
    }


# --- the run -----------------------------------------------------------------------------


async def run(running: Any, rounds: int, seconds: float) -> dict[str, Any]:
    server = running.server
    unchecked = UncheckedServer(running.info, running.work_dir / "unchecked", server.key)
    unchecked.log_path.parent.mkdir(parents=True, exist_ok=True)
    unchecked.start()
    figures: dict[str, Any] = {}
    try:
        async with (
            grpc.aio.insecure_channel(server.address) as channel,
            grpc.aio.insecure_channel(unchecked.address) as open_channel,
        ):
            await announce_serving(channel, server)
            await announce_serving(open_channel, unchecked)
            secrets_ = await principals(channel, server.key, running.info.dsn)
            checked: Any = dataset_service_pb2_grpc.DatasetServiceStub(channel)
            baseline: Any = dataset_service_pb2_grpc.DatasetServiceStub(open_channel)
            owner, viewer, scoped = secrets_["owner"], secrets_["viewer"], secrets_["scoped"]
            variants = [
                Variant("owner", "app owner's personal key", checked, owner, server.pid),
                Variant("viewer", "dataset Viewer's personal key", checked, viewer, server.pid),
                Variant("scoped", "dataset-scoped read key", checked, scoped, server.pid),
                Variant("off", "rules off (owner's key)", baseline, owner, unchecked.pid),
            ]
            print(
                f"GetDataset: {rounds} interleaved rounds of {seconds:g}s per variant, "
                f"{CONCURRENCY} in flight ...",
                flush=True,
            )
            await rules_are_off(checked, baseline, scoped)
            figures["get"] = await get_dataset(variants, rounds, seconds)
            figures["titles"] = {v.name: v.title for v in variants}
            print("the rule check alone, in this process ...", flush=True)
            figures["check_us"] = await check_cost(
                running.info.dsn, {"owner": owner, "viewer": viewer, "scoped": scoped}
            )
            print(f"inserting {AUDIT_ROWS:,} audit events (generate_series) ...", flush=True)
            figures["audit_insert_s"] = await insert_audit(running.info.dsn)
            print(f"  {figures['audit_insert_s']:.1f}s with VACUUM ANALYZE", flush=True)
            print(f"ListAuditEvents: {AUDIT_CALLS} calls per case, interleaved ...", flush=True)
            figures["audit"] = await list_audit(channel, server.key, running.info.dsn)
    finally:
        code = unchecked.stop()
        if code not in (0, None):
            print(f"the unchecked server exited with code {code}:\n{unchecked.log_tail()}")
    return figures


def report(figures: dict[str, Any], rounds: int, seconds: float) -> None:
    get, titles = figures["get"], figures["titles"]
    print(
        f"\nGetDataset, {CONCURRENCY} in flight, medians of {rounds} interleaved rounds of "
        f"{seconds:g}s (ratios: to the rules-off server in the same round):"
    )
    print(f"{'':<34}{'calls/s':>10}{'ratio':>8}{'server CPU/call':>17}{'ratio':>8}")
    for name in ("owner", "viewer", "scoped", "off"):
        f = get[name]
        print(
            f"{titles[name]:<34}{f['per_second']:>10,.0f}{f['ratio']:>8.3f}"
            f"{f['cpu_us']:>15,.0f}us{f['cpu_ratio']:>8.3f}"
        )
    off_cpu = get["off"]["cpu_us"]
    print(
        f"the rule check alone (Call.admit, in-process, best of 5 x {CHECKS:,}), beside the "
        f"server CPU of a GetDataset with the rules off ({off_cpu:,.0f}us):"
    )
    for name, cost in figures["check_us"].items():
        print(f"  {titles[name]:<32}{cost:>8.1f}us  {cost / off_cpu:>7.2%}")
    print(f"\nListAuditEvents, {AUDIT_ROWS:,} events in the app ({AUDIT_CALLS} calls each):")
    print(f"{'first page':<26}{'events':>8}{'p50':>10}{'p99':>10}{'raw p50':>10}")
    for name, title in (
        ("app", "whole app"),
        ("dataset", "dataset filter (1%)"),
        ("user", "user filter (2%)"),
    ):
        f = figures["audit"][name]
        print(
            f"{title:<26}{f['events']:>8}{f['p50_ms']:>8.2f}ms{f['p99_ms']:>8.2f}ms"
            f"{f['raw_p50_ms']:>8.2f}ms"
        )
    print("target: the checks cost <= 10% of GetDataset calls/s (ratio >= 0.90):")
    for name in ("owner", "viewer", "scoped"):
        ratio, cpu = get[name]["ratio"], get[name]["cpu_ratio"]
        verdict = "met" if ratio >= 1 - TARGET else "NOT met"
        check = figures["check_us"][name] / get["off"]["cpu_us"]
        print(
            f"  {titles[name]}: {ratio:.3f} -> {verdict} (server CPU per call {cpu:.3f}x; "
            f"the check alone {check:.2%} of a call's server CPU)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-unchecked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_unchecked:
        return serve_unchecked()
    install_sigterm_handler()
    rounds = int(os.environ.get("BENCH_AUTH_ROUNDS", "12"))
    seconds = float(os.environ.get("BENCH_AUTH_SECONDS", "1.5"))
    load = load_average()
    started = time.monotonic()
    # Nothing embeds in the background while the calls are measured.
    os.environ["DATASETD_BUILTIN_EMBEDDERS"] = "off"
    with stack_and_server(started) as running:
        figures = asyncio.run(run(running, rounds, seconds))
    print(f"environment: {environment(load)}")
    report(figures, rounds, seconds)
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
