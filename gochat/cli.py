"""The ``gochat`` command: ``serve``, ``chat``, ``migrate``, ``doctor``, ``version``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gochat import __version__
from gochat.config import ENV_PREFIX, load_settings
from gochat.errors import ConfigError, GochatError

__all__ = ["main"]

_SERVE_EPILOG = f"""\
Every setting can also come from a TOML file (--config; keys as in docs/configuration.md, at the
top level or under [gochat]) or from {ENV_PREFIX}* environment variables, e.g.
{ENV_PREFIX}WS_PORT=9000, {ENV_PREFIX}DATA_DIR=/var/lib/gochat, {ENV_PREFIX}JWT_ALGORITHM=RS256.
Precedence: flags > environment > file > defaults. See docs/configuration.md for all settings.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gochat", description="gochat instant-messaging server")
    parser.add_argument("--version", action="version", version=f"gochat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run a gochat node",
        description="Run a gochat node: WebSocket gateway (/ws) and HTTP API.",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--config", metavar="FILE.toml", help="TOML configuration file")
    serve.add_argument("--data-dir", help="data directory (default ./gochat-data)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--ws-port", type=int, help="WebSocket port (default 8700; 0 = any free port)")
    serve.add_argument("--http-port", type=int, help="HTTP API port (default 8701; 0 = any free port)")
    serve.add_argument("--node-id", type=int, help="node id 0-1023 (default 0)")
    serve.add_argument("--jwt-algorithm", choices=("EdDSA", "RS256"), help="access-token algorithm")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    serve.add_argument("--redis", dest="redis_url", metavar="URL", help="Redis URL: cluster mode (with --postgres)")
    serve.add_argument("--postgres", dest="postgres_dsn", metavar="DSN", help="PostgreSQL DSN: cluster mode (with --redis)")
    serve.add_argument("--workers", type=int, help="node processes sharing the ports (cluster mode)")

    chat = sub.add_parser("chat", help="terminal chat client", description="A small terminal chat client.")
    from gochat.cli_chat import add_chat_arguments

    add_chat_arguments(chat)
    migrate = sub.add_parser(
        "migrate",
        help="create or upgrade the PostgreSQL schema",
        description="Apply pending schema migrations to a PostgreSQL database (safe to run on every deploy).",
    )
    migrate.add_argument("--postgres", dest="postgres_dsn", metavar="DSN", help="PostgreSQL DSN (or GOCHAT_POSTGRES_DSN)")
    migrate.add_argument("--schema", help="schema name (default gochat, or GOCHAT_POSTGRES_SCHEMA)")
    doctor = sub.add_parser(
        "doctor",
        help="check the store, Redis and the nodes' clocks; print what to fix",
        description="Check a node's dependencies with its settings (same sources as serve): indexes and plans "
        "of the hot queries, table statistics, replication lag, Redis memory and eviction policy, clock skew "
        "between nodes. Exit status 0: nothing to fix; 1: something to fix; 2: unusable settings.",
        epilog="docs/observability.md, \"gochat doctor\", lists every check.",
    )
    from gochat.doctor import add_doctor_arguments

    add_doctor_arguments(doctor)
    sub.add_parser("version", help="print the version and whether the native modules are loaded")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        overrides = {
            "data_dir": args.data_dir,
            "host": args.host,
            "ws_port": args.ws_port,
            "http_port": args.http_port,
            "node_id": args.node_id,
            "jwt_algorithm": args.jwt_algorithm,
            "log_level": args.log_level,
            "redis_url": args.redis_url,
            "postgres_dsn": args.postgres_dsn,
            "workers": args.workers,
        }
        try:
            settings = load_settings(args.config, overrides=overrides)
        except ConfigError as exc:
            print(f"gochat: {exc.message}", file=sys.stderr)
            return 2
        from gochat.server import run

        config_file = args.config
        return run(settings, lambda: load_settings(config_file, overrides=overrides))
    if args.command == "chat":
        from gochat.cli_chat import chat_main

        return chat_main(args)
    if args.command == "doctor":
        from gochat.doctor import doctor_main

        return doctor_main(args)
    if args.command == "migrate":
        import asyncio
        import os

        from gochat.store.postgres import migrate as run_migrations

        dsn = args.postgres_dsn or os.environ.get(f"{ENV_PREFIX}POSTGRES_DSN", "")
        schema = args.schema or os.environ.get(f"{ENV_PREFIX}POSTGRES_SCHEMA", "gochat")
        if not dsn:
            print("gochat: migrate needs --postgres DSN or GOCHAT_POSTGRES_DSN", file=sys.stderr)
            return 2
        try:
            version = asyncio.run(run_migrations(dsn, schema))
        except GochatError as exc:
            print(f"gochat: migration failed: {exc.message}", file=sys.stderr)
            return 1
        print(f"gochat: schema {schema!r} is at version {version}")
        return 0
    from gochat import protocol

    print(f"gochat {__version__} (codec: {protocol.IMPLEMENTATION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
