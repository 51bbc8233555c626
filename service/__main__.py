"""`python -m service serve` runs the server; `keys create` issues an API key."""

from __future__ import annotations

import argparse
import asyncio
import sys

from service.config import Config, ConfigError
from service.observability import setup_logging


async def _create_key(config: Config, app_id: str, description: str) -> str:
    from service.app import open_database
    from service.domain.auth import new_key
    from service.domain.errors import Violations
    from service.domain.validation import check_id
    from service.storage.api_keys import PgApiKeyRepository
    from service.storage.db import migrate

    violations = Violations()
    check_id(violations, "--app", app_id)
    violations.raise_if_any()
    async with open_database(config) as db:
        async with db.connection() as conn:
            await migrate(conn)
        secret, key = new_key(app_id, description)
        await PgApiKeyRepository(db).insert(key)
    return secret


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="datasetd", description="datasetd dataset service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server (settings from DATASETD_* variables)")
    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create an API key and print it once")
    create.add_argument("--app", required=True, help="app the key gives access to")
    create.add_argument("--description", default="", help="what the key is for")
    args = parser.parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    if args.command == "serve":
        from service.app import serve

        asyncio.run(serve(config))
        return 0
    secret = asyncio.run(_create_key(config, args.app, args.description))
    print(secret)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
