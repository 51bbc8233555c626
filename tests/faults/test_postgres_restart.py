"""PostgreSQL restarted (`pg_ctl restart -m immediate`) under a load of four writers.

Uploads (batches and streams), version builds and exports run while PostgreSQL is killed
and comes back after crash recovery. The contract: every call ends OK or UNAVAILABLE
(never INTERNAL or UNKNOWN, never at its deadline); health leaves SERVING when an outage
lasts long enough to be seen and is SERVING again within 10 s of PostgreSQL accepting;
the server's pool reconnects by itself (calls succeed afterwards without a server
restart); and the ledger check holds: every acknowledged input present exactly once with
its bytes, every READY version complete, every downloaded export a whole zip.

Restarts alternate between a plain `pg_ctl restart -m immediate` (down for well under a
second) and an immediate stop held down for HELD_DOWN_SECONDS before the start, long
enough that health must notice.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.harness import (
    FaultStack,
    Writers,
    fault_stack,
    serving_healthy,
    wait_for_versions,
)
from tests.faults.ledger import Ledger, check_ledger

RECOVERY_SECONDS = 10.0
HELD_DOWN_SECONDS = 3.0
# Load between two restarts: enough for builds and exports to be in flight at each.
LOAD_SECONDS = 3.0


async def restart_under_load(stack: FaultStack, restarts: int) -> list[float]:
    """Runs the load through `restarts` restarts; returns the recovery time of each."""
    ledger = Ledger()
    recoveries = []
    async with serving_healthy(stack, RECOVERY_SECONDS) as served:
        health = served.health
        async with Writers(stack, served.channel, ledger) as writers:
            for restart in range(restarts):
                await asyncio.sleep(LOAD_SECONDS)
                began = time.monotonic()
                held = HELD_DOWN_SECONDS if restart % 2 == 0 else 0.0
                if held:
                    accepting = await stack.postgres.restart_held(held)
                else:
                    accepting = await stack.postgres.restart()
                recoveries.append(await health.serving_again(accepting, RECOVERY_SECONDS))
                if held:
                    assert health.left_serving_between(began, accepting), (
                        f"health stayed SERVING through {held}s without PostgreSQL"
                    )
            # Readiness follows PostgreSQL; liveness must not, or every replica restarts.
            assert not health.liveness_lost, health.liveness_lost
            await asyncio.sleep(LOAD_SECONDS)
        outcomes = writers.outcomes
        print(f"{restarts} restarts: {dict(outcomes.by_code)}, recoveries {recoveries}")
        assert not outcomes.violations, "\n".join([*outcomes.violations[:20], stack.log_tail()])
        assert not stack.server_internal_errors(), stack.log_tail()
        # The load ran into the restarts (or the test proved nothing) and went on after.
        assert outcomes.by_code["UNAVAILABLE"] > 0, outcomes.by_code
        assert outcomes.by_code["OK"] > 0, outcomes.by_code
        await wait_for_versions(stack, ledger, 60)
    report = await check_ledger(stack.db, stack.objects, ledger)
    print(report)
    assert report.acknowledged_inputs > 0 and report.ready_versions > 0, report
    return recoveries


async def test_postgres_restarts_under_load() -> None:
    async with fault_stack() as stack:
        await restart_under_load(stack, restarts=2)


@pytest.mark.slow
async def test_postgres_restarts_ten_times_under_load() -> None:
    async with fault_stack() as stack:
        await restart_under_load(stack, restarts=10)
