"""Running upload batches: a bounded pool of worker threads, and transient errors retried.

Retrying is safe because every call carries a request id derived from its content (see
`messages.request_id_of`): the server answers a repeated call with its recorded answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from service.client._rpc import Rpc
from service.client.errors import DatasetdError
from service.client.progress import Progress
from service.client.sources import Failure
from service.client.upload.plan import Batch

RETRIES = 4
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# The code of a boxed input refused for its boxes alone (a box outside the image, an
# annotation id taken): the upload sends it again without them, and the boxes through
# CreateAnnotations, so that as before only the bad box fails. Never logged.
REGIONS_REFUSED = "regions_refused"

Outcome = tuple[int, Failure | None]  # (index, None when created)
Work = Callable[[Batch], list[Outcome]]


def call(rpc: Rpc, method: Callable[..., Any], make_request: Callable[[], Any]) -> Any:
    """Retries transient failures: safe because the request id makes each call idempotent."""
    for attempt in range(RETRIES):
        try:
            return rpc.call(method, make_request())
        except DatasetdError as error:
            if error.code not in TRANSIENT or attempt == RETRIES - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


class Engine:
    """Runs `work` on batches with at most `concurrency` calls in flight."""

    def __init__(self, work: Work, concurrency: int, progress: Progress) -> None:
        if not 1 <= concurrency <= 64:
            raise ValueError(f"concurrency must be 1..64, got {concurrency}")
        self.work = work
        self.concurrency = concurrency
        self.progress = progress

    def run(self, label: str, units: Iterator[Batch], total: int) -> Iterator[Outcome]:
        """Runs the batches; yields their outcomes as they come.

        Batches are planned (and files read) only as workers free up, so memory
        holds a few batches, not the whole source.
        """
        self.progress.start(label, total, "uploads")
        pool = futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="datasetd-upload")
        pending: set[futures.Future[list[Outcome]]] = set()
        try:
            exhausted = False
            while True:
                while not exhausted and len(pending) < self.concurrency * 2:
                    unit = next(units, None)
                    if unit is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(self.work, unit))
                if not pending:
                    break
                finished, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                done = failed = 0
                for future in finished:
                    for outcome in future.result():
                        done += 1
                        failure = outcome[1]
                        failed += failure is not None and failure.code != REGIONS_REFUSED
                        yield outcome
                self.progress.advance(done, failed)
        finally:
            # On Ctrl-C: nothing new starts; calls already running finish on their own.
            pool.shutdown(wait=not pending, cancel_futures=True)
