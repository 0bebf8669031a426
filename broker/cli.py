"""The `redwire` command line: `redwire serve` (the broker) and `redwire echo`.

Flags override `REDWIRE_*` environment variables, which override an optional TOML file
(`--config` or `REDWIRE_CONFIG`); all of it becomes one `Settings`. Worker processes are
started as `python -m worker`, so this package never imports the worker code.
"""

from __future__ import annotations

import argparse
import os
import sys

from broker.errors import ConfigError
from broker.settings import Settings


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8765)")
    parser.add_argument("--config", help="TOML file with settings")
    parser.add_argument("--log-level", dest="log_level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redwire", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="run a WebSocket echo server (one process)")
    _common(echo)
    serve = sub.add_parser("serve", help="run the pub/sub broker")
    _common(serve)
    serve.add_argument("--workers", type=int, help="worker processes (default: CPU count)")
    serve.add_argument("--redis", dest="redis_url", help="Redis URL (default: embedded)")
    serve.add_argument("--app", help="application hooks as module:object")
    serve.add_argument("--api-key", dest="api_key", help="enables POST /publish")
    serve.add_argument("--static-dir", dest="static_dir", help="serve these web files at /")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        k: v for k, v in vars(args).items() if k not in ("command", "config") and v is not None
    }
    if overrides.get("static_dir"):  # workers share our cwd, but say it plainly
        overrides["static_dir"] = os.path.abspath(overrides["static_dir"])
    try:
        settings = Settings.load(toml_path=args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"redwire: {exc}", file=sys.stderr)
        return 2
    if args.command == "echo":
        env = {**os.environ, **settings.to_env()}
        argv_worker = [sys.executable, "-m", "worker", "echo"]
        os.execve(sys.executable, argv_worker, env)
    from broker.supervisor import run_supervisor

    try:
        return run_supervisor(settings)
    except ConfigError as exc:
        print(f"redwire: {exc}", file=sys.stderr)
        return 2
