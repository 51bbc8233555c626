"""datasetd: self-hosted dataset management as an async gRPC service."""

import os

# gRPC's core restarts its event-engine threads in a forked child. Between
# fork and exec of the embedded PostgreSQL and S3 servers, subprocess closes
# every inherited descriptor, the restarted poller hits a closed epoll fd and
# the child aborts (seen as PostgreSQL "exiting with code -6"). We never fork
# to run gRPC in a child, so the support is off unless explicitly asked for.
# Read when gRPC initialises, i.e. on the first channel or server, not at import.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
