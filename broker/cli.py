"""The `redwire` command line.

    redwire serve [flags]            the pub/sub broker (supervisor + workers)
    redwire echo [flags]             a WebSocket echo server (one process)
    redwire check-config [flags]     the effective settings and the source of each
    redwire publish TOPIC DATA       publish one message over WebSocket, print the ack
    redwire subscribe TOPIC ...      print messages as JSON lines until stopped
    redwire --version

Flags override `REDWIRE_*` environment variables, which override an optional TOML file
(`--config` or `REDWIRE_CONFIG`); all of it becomes one `Settings` (`serve --help` lists them).
Worker processes are started as `python -m worker`, so this package never imports the worker
code. `publish` and `subscribe` are clients: they run in the `client.cli` module, built on the
Python client, which this package must not depend on (the client depends on the broker, not
the other way round). So this module only parses their arguments and loads `client.cli` by
name (`importlib.import_module`), and only when one of those two subcommands runs: importing
`broker` never loads the client.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

from broker.cli_tools import check_config, settings_reference, version
from broker.errors import ConfigError
from broker.settings import Settings

DEFAULT_URL = "ws://127.0.0.1:8765/"
LOG_LEVELS = ("debug", "info", "warning", "error")
CLIENT_MODULE = "client.cli"  # publish/subscribe; loaded by name, see the module docstring

# Flags that set a Settings field: (flag, field, argparse keyword arguments).
_COMMON_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--host", "host", {"help": "address to listen on (default 127.0.0.1)"}),
    ("--port", "port", {"type": int, "help": "port to listen on (default 8765)"}),
    (
        "--log-level",
        "log_level",
        {"type": str.lower, "choices": LOG_LEVELS, "help": "log level (default info)"},
    ),
)
_SERVE_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--workers", "workers", {"type": int, "help": "worker processes (default: CPU count)"}),
    ("--redis", "redis_url", {"help": "Redis URL (default: embedded)"}),
    ("--app", "app", {"help": "application hooks as module:object"}),
    ("--api-key", "api_key", {"help": "enables POST /publish (visible in ps: see --api-key-file)"}),
    (
        "--api-key-file",
        "api_key_file",
        {"metavar": "FILE", "help": "read the API key from FILE (kept out of argv and environ)"},
    ),
    (
        "--jwt-secret-file",
        "jwt_secret_file",
        {
            "metavar": "FILE",
            "help": "verify connection JWTs (HS256) with the secrets in FILE,"
            " one per line (rotation)",
        },
    ),
    ("--static-dir", "static_dir", {"help": "serve these web files at /"}),
    (
        "--certfile",
        "certfile",
        {"metavar": "PEM", "help": "serve wss:// and https:// with this certificate (and chain)"},
    ),
    ("--keyfile", "keyfile", {"metavar": "PEM", "help": "the certificate's private key"}),
    (
        "--metrics-listen",
        "metrics_listen",
        {"metavar": "HOST:PORT", "help": "serve /metrics here instead of on the public port"},
    ),
    (
        "--trusted-proxy",
        "trusted_proxies",
        {
            "action": "append",
            "metavar": "CIDR",
            "help": "a load balancer whose X-Forwarded-For / PROXY header names the client"
            " (repeatable)",
        },
    ),
    (
        "--proxy-protocol",
        "proxy_protocol",
        {
            "action": "store_const",
            "const": True,
            "help": "connections start with a PROXY v1/v2 header (needs --trusted-proxy)",
        },
    ),
    (
        "--allowed-origin",
        "allowed_origins",
        {
            "action": "append",
            "metavar": "ORIGIN",
            "help": "a browser Origin besides the same origin, scheme://host[:port]; '*' for"
            " any site (repeatable)",
        },
    ),
    (
        "--allowed-host",
        "allowed_hosts",
        {
            "action": "append",
            "metavar": "HOST",
            "help": "a Host header to answer: name, name:port, or .name for its subdomains"
            " (repeatable)",
        },
    ),
)
FLAG_NAMES: Mapping[str, str] = {field: flag for flag, field, _ in _COMMON_FLAGS + _SERVE_FLAGS}


def _settings_flags(
    parser: argparse.ArgumentParser, flags: tuple[tuple[str, str, dict[str, Any]], ...]
) -> None:
    for flag, field, kwargs in flags:
        parser.add_argument(flag, dest=field, **kwargs)


def _config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file with settings (a [redwire] table)")


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL})")
    parser.add_argument("--token", help="sent as ?token= (for application hooks that check it)")
    parser.add_argument("--msgpack", action="store_true", help="speak msgpack instead of JSON")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    overview = __doc__.split("\n\n", 2)[1]  # the table of commands
    parser = argparse.ArgumentParser(prog="redwire", description=overview, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"redwire {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    echo = sub.add_parser("echo", help="run a WebSocket echo server (one process)")
    _settings_flags(echo, _COMMON_FLAGS)
    _config_flag(echo)

    reference = settings_reference()
    serve = sub.add_parser(
        "serve", help="run the pub/sub broker", epilog=reference, formatter_class=raw
    )
    check = sub.add_parser(
        "check-config",
        help="print the effective settings and where each came from",
        description="Print the settings `redwire serve` would run with, one per line, with\n"
        "the source of each (default, toml FILE, env REDWIRE_X, flag --x); secrets are\n"
        "masked. Exit 2 on an invalid configuration, with the error.",
        epilog=reference,
        formatter_class=raw,
    )
    for p in (serve, check):
        _settings_flags(p, _COMMON_FLAGS + _SERVE_FLAGS)
        _config_flag(p)

    publish = sub.add_parser(
        "publish",
        help="publish one message, print the ack as JSON",
        description="Publish DATA to TOPIC and print the server's ack as one JSON line. DATA"
        " is JSON; text that does not parse as JSON is sent as a string. Exit 1 when the"
        " publish fails (the error code and reason go to stderr).",
    )
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument("data", metavar="DATA")
    publish.add_argument("--key", help="idempotency key: a retry with it publishes once")
    _client_flags(publish)

    subscribe = sub.add_parser(
        "subscribe",
        help="print messages as JSON lines",
        description='Subscribe to each TOPIC and print one JSON object per line: {"topic",'
        ' "offset", "epoch", "data"} per message (offset and epoch are null on topics'
        ' without history), {"gap": {"topic", "reason"}} where messages may be missing.'
        " Stops on SIGINT/SIGTERM, or after --count messages.",
    )
    subscribe.add_argument("topics", metavar="TOPIC", nargs="+")
    subscribe.add_argument(
        "--since",
        metavar="OFFSET:EPOCH",
        help="start after this position (topics with history; applies to every TOPIC)",
    )
    subscribe.add_argument("--count", type=int, help="exit after this many messages")
    _client_flags(subscribe)
    return parser


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings fields the flags in `args` set."""
    overrides = {
        field: getattr(args, field)
        for field in FLAG_NAMES
        if getattr(args, field, None) is not None
    }
    for field, value in overrides.items():
        if isinstance(value, list):  # a repeatable flag: the setting is a tuple
            overrides[field] = tuple(value)
    if "log_level" in overrides:
        overrides["log_level"] = overrides["log_level"].upper()
    # Workers share our cwd, but say it plainly.
    for path in ("static_dir", "api_key_file", "jwt_secret_file"):
        if overrides.get(path):
            overrides[path] = os.path.abspath(overrides[path])
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("publish", "subscribe"):
        client_cli = importlib.import_module(CLIENT_MODULE)
        return int(client_cli.main(args))
    overrides = settings_overrides(args)
    if args.command == "check-config":
        return check_config(
            sys.stdout,
            sys.stderr,
            toml_path=args.config,
            environ=os.environ,
            overrides=overrides,
            flag_names=FLAG_NAMES,
        )
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
