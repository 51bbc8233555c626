"""`python -m service.worker --index I --ready-fd FD`: one server process of the several that
`datasetd serve` runs with DATASETD_WORKERS above 1 (service.supervisor starts it).

Not a command for people: the supervisor passes what it resolved (the embedded stack's
addresses, the ports it picked) in the DATASETD_* environment, keeps the other end of the
worker's standard input as a lifeline, and reads the worker's JSON ready line from FD."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence


class _WorkerFilter(logging.Filter):
    """Names the worker on every record: a `worker` field of JSON logs, a prefix of text."""

    def __init__(self, index: int, prefix: bool) -> None:
        super().__init__()
        self._index = index
        self._prefix = f"[worker {index}] " if prefix else ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self._index
        if self._prefix and not getattr(record, "_worker_named", False):
            record.msg = f"{self._prefix}{record.msg}"
            record._worker_named = True
        return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    from service.config import Config, ConfigError
    from service.observability import setup_logging

    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerFilter(args.index, prefix=config.log_format == "text"))
    from service.app import serve_worker

    asyncio.run(serve_worker(config, args.index, args.ready_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
