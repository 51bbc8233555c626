"""PostgreSQL and S3 together: the whole development stack in one directory."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import pathlib
import time
from typing import Self

from service.devstack.postgres import EmbeddedPostgres
from service.devstack.seaweedfs import EmbeddedS3, S3Endpoint

log = logging.getLogger(__name__)


class EmbeddedStack:
    """PostgreSQL in `data_dir/postgres` and S3 in `data_dir/s3`."""

    def __init__(self, data_dir: pathlib.Path, bucket: str = "datasetd") -> None:
        self.data_dir = pathlib.Path(data_dir)
        self.postgres = EmbeddedPostgres(self.data_dir / "postgres")
        self.s3 = EmbeddedS3(self.data_dir / "s3", bucket)

    @property
    def dsn(self) -> str:
        return self.postgres.dsn

    @property
    def s3_endpoint(self) -> S3Endpoint:
        return self.s3.endpoint

    def start(self) -> tuple[str, S3Endpoint]:
        """Start both, concurrently: weed takes the longer."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="embedded-start")
        try:
            pg = pool.submit(self.postgres.start)
            s3 = pool.submit(self.s3.start)
            errors = [e for e in (pg.exception(), s3.exception()) if e is not None]
        except BaseException:
            # A Ctrl-C while waiting: the start threads run on regardless, and
            # stop() waits for each to finish before stopping its server.
            self.stop()
            raise
        finally:
            pool.shutdown(wait=False)
        if errors:
            with contextlib.suppress(Exception):
                self.stop()
            if len(errors) == 2:
                errors[0].add_note(f"the other server failed too: {errors[1]!r}")
            raise errors[0]
        log.info("embedded stack ready in %.2fs", time.monotonic() - started)
        return pg.result(), s3.result()

    def stop(self) -> None:
        """Stop both (concurrently); a server that is not running is skipped.
        Raises only if a server could not be stopped, after trying both."""
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="embedded-stop") as pool:
            futures = [pool.submit(self.s3.stop), pool.submit(self.postgres.stop)]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        for exc in errors:
            log.error("stopping the embedded stack failed: %s", exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
