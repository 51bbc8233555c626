import os

# This process keeps gRPC channels and servers open while it starts the embedded servers
# with a preexec_fn, i.e. with fork(). gRPC's fork support then restarts its poller thread
# in the child, which aborts when subprocess closes the child's descriptors before exec
# ("epoll_wait error: Bad file descriptor", grpc/grpc#43055): the embedded PostgreSQL
# died at start now and then. Nothing here uses gRPC in a forked child. Read when gRPC
# first initializes, so it is set before any test or benchmark module makes a channel.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
