"""The ``gochat`` command: ``serve``, ``chat``, ``version``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gochat import __version__
from gochat.config import ENV_PREFIX, load_settings
from gochat.errors import ConfigError

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

    chat = sub.add_parser("chat", help="terminal chat client", description="A small terminal chat client.")
    from gochat.cli_chat import add_chat_arguments

    add_chat_arguments(chat)
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
        }
        try:
            settings = load_settings(args.config, overrides=overrides)
        except ConfigError as exc:
            print(f"gochat: {exc.message}", file=sys.stderr)
            return 2
        from gochat.server import run

        run(settings)
        return 0
    if args.command == "chat":
        from gochat.cli_chat import chat_main

        return chat_main(args)
    from gochat import protocol

    print(f"gochat {__version__} (codec: {protocol.IMPLEMENTATION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
