"""Benchmark of faults: PostgreSQL restarts and an object store that goes away, under the
load of four writers, against the real server.

Starts an embedded stack (PostgreSQL + SeaweedFS) with the fault proxy of
tests/faults/proxy.py in front of each, and the real server as a subprocess pointed at the
proxies (the same harness as the fault tests: tests/faults/harness.py). Four writers upload
batches (CreateInputs) and streams (UploadInput), build versions and export and download
them, retrying what ends UNAVAILABLE with the same request id. Meanwhile:

1. PostgreSQL restarts (`pg_ctl restart -m immediate`; every other one held down 3 s);
2. the object store is blackholed, then its connections reset, then slowed by latency.

Prints, per fault, when it healed and how long the service took to recover (health
SERVING again; the first upload begun after healing acknowledged), then the requests sent,
their outcomes by status code, inputs acknowledged / lost / duplicated (read back from
PostgreSQL and S3 directly, with the ledger check of the fault tests) and the server's peak
RSS.

    .venv/bin/python -m bench.bench_faults             # 10 restarts, a 30 s blackhole
    .venv/bin/python -m bench.bench_faults --quick     # 2 restarts, a 5 s blackhole
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Sequence

from bench.common import environment, install_sigterm_handler, load_average
from tests.faults.harness import (
    FaultStack,
    HealthWatch,
    Outcomes,
    Writers,
    fault_stack,
    peak_rss,
    serving_healthy,
    wait_for_versions,
)
from tests.faults.ledger import Ledger, check_ledger

HELD_DOWN_SECONDS = 3.0
RESET_SECONDS = 3.0
LATENCY_SECONDS = 5.0
# Load between two faults.
LOAD_SECONDS = 3.0
# How long a recovery is waited for before it counts as "not recovered".
RECOVERY_LIMIT_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Settings:
    restarts: int
    blackhole_seconds: float
    s3_timeout_seconds: float


def parse_args(argv: Sequence[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 restarts, a 5 s blackhole")
    args = parser.parse_args(argv)
    if args.quick:
        return Settings(restarts=2, blackhole_seconds=5.0, s3_timeout_seconds=2.0)
    return Settings(restarts=10, blackhole_seconds=30.0, s3_timeout_seconds=10.0)


@dataclasses.dataclass
class Fault:
    name: str
    began_at: float
    healed_at: float
    left_serving: bool = False
    health_seconds: float | None = None
    upload_seconds: float | None = None


async def _recovery(fault: Fault, health: HealthWatch, outcomes: Outcomes) -> None:
    """Fills in how long after healing health said SERVING and an upload begun after
    healing was acknowledged."""
    fault.left_serving = health.left_serving_between(fault.began_at, fault.healed_at)
    try:
        fault.health_seconds = await health.serving_again(fault.healed_at, RECOVERY_LIMIT_SECONDS)
    except AssertionError:
        fault.health_seconds = None
    deadline = fault.healed_at + RECOVERY_LIMIT_SECONDS
    while time.monotonic() < deadline:
        uploaded = outcomes.first_ok_started_after("CreateInputs", fault.healed_at)
        if uploaded is not None:
            fault.upload_seconds = uploaded - fault.healed_at
            return
        await asyncio.sleep(0.1)


async def _postgres_restarts(
    stack: FaultStack, settings: Settings, health: HealthWatch, outcomes: Outcomes
) -> list[Fault]:
    faults = []
    for restart in range(settings.restarts):
        await asyncio.sleep(LOAD_SECONDS)
        began = time.monotonic()
        if restart % 2 == 0:
            accepting = await stack.postgres.restart_held(HELD_DOWN_SECONDS)
            name = f"PostgreSQL down {HELD_DOWN_SECONDS:.0f}s"
        else:
            accepting = await stack.postgres.restart()
            name = "PostgreSQL restart -m immediate"
        fault = Fault(f"{restart + 1:2}. {name}", began, accepting)
        await _recovery(fault, health, outcomes)
        faults.append(fault)
    return faults


async def _object_store(
    stack: FaultStack, settings: Settings, health: HealthWatch, outcomes: Outcomes
) -> list[Fault]:
    proxy = stack.s3_proxy
    faults = []
    steps = [
        (f"S3 blackholed {settings.blackhole_seconds:.0f}s", proxy.blackhole, None),
        (f"S3 connections reset {RESET_SECONDS:.0f}s", proxy.reset, None),
        (
            f"S3 +{settings.s3_timeout_seconds / 5:.1f}s latency each way, {LATENCY_SECONDS:.0f}s",
            proxy.pass_through,
            settings.s3_timeout_seconds / 5,
        ),
    ]
    durations = [settings.blackhole_seconds, RESET_SECONDS, LATENCY_SECONDS]
    for (name, inject, latency), seconds in zip(steps, durations, strict=True):
        await asyncio.sleep(LOAD_SECONDS)
        began = time.monotonic()
        inject()
        if latency is not None:
            proxy.set_latency(latency)
        await asyncio.sleep(seconds)
        proxy.pass_through()
        proxy.set_latency(0.0)
        fault = Fault(name, began, time.monotonic())
        await _recovery(fault, health, outcomes)
        faults.append(fault)
    return faults


@dataclasses.dataclass
class Result:
    faults: list[Fault]
    outcomes: Outcomes
    acknowledged: int
    lost: int
    duplicated: int
    ledger_problems: list[str]
    ledger_summary: str
    server_internal_errors: list[str]
    peak_rss: int
    seconds: float


async def _inputs_lost_and_duplicated(stack: FaultStack, ledger: Ledger) -> tuple[int, int, int]:
    entry = ledger.app(stack.app)
    rows = await stack.db.fetch(
        "SELECT i.id, b.sha256 FROM inputs i LEFT JOIN blobs b ON b.key = i.blob_key"
        " WHERE i.app_id = $1",
        stack.app,
    )
    present = {r["id"] for r in rows}
    lost = sum(1 for input_id in entry.inputs if input_id not in present)
    # More inputs with the same bytes than the clients sent them: a retry written twice.
    stored = Counter(r["sha256"] for r in rows)
    acknowledged = Counter(a.sha256 for a in entry.inputs.values())
    duplicated = sum(
        max(0, count - acknowledged[sha256] - entry.unacknowledged[sha256])
        for sha256, count in stored.items()
    )
    return len(entry.inputs), lost, duplicated


async def bench(settings: Settings) -> Result:
    started = time.monotonic()
    async with fault_stack() as stack:
        ledger = Ledger()
        timeout = f"{settings.s3_timeout_seconds}s"
        async with serving_healthy(
            stack, RECOVERY_LIMIT_SECONDS, DATASETD_S3_TIMEOUT=timeout
        ) as served:
            print("load: 4 writers; PostgreSQL restarts ...", flush=True)
            async with Writers(stack, served.channel, ledger) as writers:
                faults = await _postgres_restarts(stack, settings, served.health, writers.outcomes)
                print("object store faults ...", flush=True)
                faults += await _object_store(stack, settings, served.health, writers.outcomes)
                await asyncio.sleep(LOAD_SECONDS)
            print("checking the ledger ...", flush=True)
            await wait_for_versions(stack, ledger, 120)
            rss = peak_rss(served.server.pid)
            internal = stack.server_internal_errors()
        acknowledged, lost, duplicated = await _inputs_lost_and_duplicated(stack, ledger)
        try:
            report = await check_ledger(stack.db, stack.objects, ledger)
            problems, summary = [], str(report)
        except AssertionError as failed:
            problems, summary = str(failed).splitlines()[1:], str(failed).splitlines()[0]
    return Result(
        faults,
        writers.outcomes,
        acknowledged,
        lost,
        duplicated,
        problems,
        summary,
        internal,
        rss,
        time.monotonic() - started,
    )


def _seconds(value: float | None) -> str:
    return "not recovered" if value is None else f"{value:.1f}s"


def format_report(result: Result, settings: Settings, load_before: float) -> str:
    outcomes = result.outcomes
    lines = ["faults injected", f"  {'fault':<42} {'health SERVING':>15} {'upload OK':>10}"]
    for fault in result.faults:
        health = _seconds(fault.health_seconds) if fault.left_serving else "stayed"
        lines.append(f"  {fault.name:<42} {health:>15} {_seconds(fault.upload_seconds):>10}")
    lines.append("  (seconds after the fault healed: PostgreSQL accepting, or S3 passing again;")
    lines.append("   'stayed': health never left SERVING while the fault lasted)")
    lines.append("")
    lines.append(f"requests sent          {outcomes.requests}")
    for code, count in outcomes.by_code.most_common():
        lines.append(f"  {code:<20} {count}")
    fast = sorted(outcomes.unavailable_seconds)
    if fast:
        lines.append(
            f"  UNAVAILABLE took      median {fast[len(fast) // 2]:.2f}s, max {fast[-1]:.2f}s "
            f"(DATASETD_S3_TIMEOUT {settings.s3_timeout_seconds:.0f}s)"
        )
    lines.append(f"contract violations    {len(outcomes.violations)}")
    lines.extend(f"  {v}" for v in outcomes.violations[:10])
    lines.append(f"server INTERNAL logged {len(result.server_internal_errors)}")
    lines.extend(f"  {line}" for line in result.server_internal_errors[:10])
    lines.append("")
    lines.append(f"inputs acknowledged    {result.acknowledged}")
    lines.append(f"inputs lost            {result.lost}")
    lines.append(f"inputs duplicated      {result.duplicated}")
    lines.append(f"ledger check           {result.ledger_summary}")
    lines.extend(f"  {p}" for p in result.ledger_problems[:10])
    lines.append(f"peak server RSS        {result.peak_rss / 2**20:.0f} MiB")
    env = environment(load_before)
    lines.append(f"environment            {env}")
    lines.append(f"total time             {result.seconds:.0f}s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    install_sigterm_handler()
    load_before = load_average()
    result = asyncio.run(bench(settings))
    print()
    print(format_report(result, settings, load_before))
    broken = result.outcomes.violations or result.ledger_problems or result.server_internal_errors
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
