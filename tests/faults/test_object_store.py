"""The object store goes away under a load of four writers: first blackholed (connections
accepted, nothing answered, as in a network partition), then every connection reset, then
slowed by added latency; then it heals.

The contract: every call ends OK or UNAVAILABLE, never INTERNAL, UNKNOWN or at its
deadline; uploads fail fast (within a couple of DATASETD_S3_TIMEOUTs, not minutes) and
cleanly (the ledger check: no input row whose blob is missing, every acknowledged input
intact); exports fail or pause and succeed when tried again; health leaves SERVING while
the store is away and everything works again within 10 s of the store healing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from service.storage.objectstore.writer import ABORT_REMOVE_SECONDS
from tests.faults.harness import (
    FaultStack,
    Outcomes,
    Writers,
    fault_stack,
    serving_healthy,
    wait_for_versions,
)
from tests.faults.ledger import Ledger, check_ledger

RECOVERY_SECONDS = 10.0
WARMUP_SECONDS = 2.0
RESET_SECONDS = 3.0
# Long enough for calls that began under the reset to end, then for some to succeed slowly.
LATENCY_PHASE_SECONDS = 5.0
UPLOADS = ("CreateInputs", "UploadInput")
# A store that accepts connections but answers nothing is only noticed by a health check
# that waits for it: one starts within 5 s (service/app.py HEALTH_INTERVAL_SECONDS) and
# gives up after 5 s more; a shorter blackhole may pass unseen by health.
SILENCE_NOTICED_SECONDS = 12.0


@dataclass(frozen=True)
class Plan:
    blackhole_seconds: float
    s3_timeout_seconds: float

    @property
    def added_latency_seconds(self) -> float:
        """Each way: a request and its answer take 0.4 timeouts longer, so calls slow down
        but must succeed."""
        return self.s3_timeout_seconds / 5

    @property
    def fail_fast_seconds(self) -> float:
        """The longest an upload may take to fail on a store that does not answer: two
        attempts of the S3 timeout (one read retry) and their backoff, the bounded removal
        of what it wrote (ObjectWriter.abort), and slack for a loaded 2-core machine."""
        return 2 * self.s3_timeout_seconds + ABORT_REMOVE_SECONDS + 3.0


def _check_failures_were_fast(outcomes: Outcomes, plan: Plan, start: float, end: float) -> int:
    failed = 0
    for method in UPLOADS:
        durations = outcomes.ended_between(method, "UNAVAILABLE", start, end)
        slow = [round(d, 1) for d in durations if d > plan.fail_fast_seconds]
        assert not slow, f"{method} took {slow}s to fail (limit {plan.fail_fast_seconds}s)"
        failed += len(durations)
    return failed


async def store_goes_away(stack: FaultStack, plan: Plan) -> float:
    """Runs the whole sequence; returns the seconds from healing until uploads succeed."""
    ledger = Ledger()
    proxy = stack.s3_proxy
    timeout = f"{plan.s3_timeout_seconds}s"
    async with serving_healthy(stack, RECOVERY_SECONDS, DATASETD_S3_TIMEOUT=timeout) as served:
        health = served.health
        async with Writers(stack, served.channel, ledger) as writers:
            await asyncio.sleep(WARMUP_SECONDS)
            blackholed = time.monotonic()
            proxy.blackhole()
            await asyncio.sleep(plan.blackhole_seconds)
            proxy.reset()
            await asyncio.sleep(RESET_SECONDS)
            slowed = time.monotonic()
            proxy.pass_through()
            proxy.set_latency(plan.added_latency_seconds)
            await asyncio.sleep(LATENCY_PHASE_SECONDS)
            healed = time.monotonic()
            proxy.set_latency(0.0)
            health_back = await health.serving_again(healed, RECOVERY_SECONDS)
            # The writers go on until uploads and an export made after healing succeed. An
            # export waits for the exports queued before it (one job slot, each retrying
            # every 2 s while the store was away): on a loaded 2-core machine that took
            # longer than 30 s once.
            deadline = healed + RECOVERY_SECONDS + 50
            outcomes = writers.outcomes
            for _ in range(int((deadline - time.monotonic()) / 0.2)):
                if outcomes.first_ok_started_after(
                    "CreateInputs", healed
                ) and outcomes.first_ok_started_after("DownloadExport", healed):
                    break
                await asyncio.sleep(0.2)
        print(f"outcomes {dict(outcomes.by_code)}; health SERVING {health_back:.1f}s after healing")
        assert not outcomes.violations, "\n".join([*outcomes.violations[:20], stack.log_tail()])
        assert not stack.server_internal_errors(), stack.log_tail()

        # The store was away and the writers noticed, quickly, through UNAVAILABLE.
        failed = _check_failures_were_fast(outcomes, plan, blackholed, slowed)
        assert failed > 0, f"no upload failed while the store was away: {outcomes.by_code}"
        assert health.left_serving_between(blackholed, slowed), health.changes
        # Readiness follows the store; liveness must not, or every replica restarts.
        assert not health.liveness_lost, health.liveness_lost
        if plan.blackhole_seconds >= SILENCE_NOTICED_SECONDS:
            # A silent store is noticed by health alone, not only once connections reset.
            assert health.left_serving_between(blackholed, blackholed + plan.blackhole_seconds), (
                health.changes
            )
        # The latency alone breaks nothing: uploads made while it lasted succeeded.
        under_latency = [
            code
            for method, code, started, _ in outcomes.calls
            if method == "CreateInputs" and slowed <= started < healed
        ]
        assert "OK" in under_latency, f"uploads begun under added latency: {under_latency}"
        # Recovery: uploads started after healing succeed within 10 s of it.
        uploaded = outcomes.first_ok_started_after("CreateInputs", healed)
        assert uploaded is not None and uploaded - healed < RECOVERY_SECONDS, (
            uploaded and uploaded - healed
        )
        # Exports: one made after healing was built, stored and downloaded whole.
        assert outcomes.first_ok_started_after("DownloadExport", healed), (
            "no export succeeded after the store healed"
        )
        await wait_for_versions(stack, ledger, 60)
    report = await check_ledger(stack.db, stack.objects, ledger)
    print(report)
    assert report.acknowledged_inputs > 0 and report.archives_checked > 0, report
    return uploaded - healed


async def test_object_store_blackholed_reset_and_slowed() -> None:
    async with fault_stack() as stack:
        await store_goes_away(stack, Plan(blackhole_seconds=5.0, s3_timeout_seconds=1.0))


@pytest.mark.slow
async def test_object_store_blackholed_for_30s_with_the_default_timeout() -> None:
    async with fault_stack() as stack:
        # The default DATASETD_S3_TIMEOUT: what production gets.
        await store_goes_away(stack, Plan(blackhole_seconds=30.0, s3_timeout_seconds=10.0))
