"""What the `redwire` command line knows about itself and its settings, without running.

- `version()`: the installed distribution's version (importlib.metadata), else the version in
  this checkout's pyproject.toml (running from a checkout that was never installed).
- `settings_reference()`: the `serve --help` epilog: the precedence rule and every setting
  with its `REDWIRE_*` name and default, generated from the `Settings` dataclass fields.
- `effective_settings()` / `check_config()`: `redwire check-config`: the settings `serve`
  would run with, each with the source that set it (default, TOML file, environment, flag),
  secrets masked (the API key, a password in redis_url).

The source of a value is worked out here from the inputs given to `Settings.load` (the TOML
file's keys, the `REDWIRE_*` names present, the flags), with the same precedence it applies:
flag > environment > TOML > default.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from broker.errors import ConfigError
from broker.settings import ENV_PREFIX, Settings, mask_url

DISTRIBUTION = "redwire"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
MASK = "***"
# Shown as *** when set; redis_url: its password (mask_url).
_SECRETS = frozenset({"api_key", "jwt_secrets"})
_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def version() -> str:
    """The installed distribution's version, or this checkout's pyproject.toml version."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        with _PYPROJECT.open("rb") as fh:
            return str(tomllib.load(fh)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def render(value: Any) -> str:
    """A value as the environment would spell it: `none`, a number, JSON for the rest."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple) and all(dataclasses.is_dataclass(v) for v in value):
        return json.dumps([dataclasses.asdict(v) for v in value], separators=(",", ":"))
    if isinstance(value, tuple):
        return json.dumps(list(value))
    if isinstance(value, Mapping):
        return json.dumps(dict(value), default=str, separators=(",", ":"))
    return str(value)


def settings_reference() -> str:
    """The `serve --help` epilog: precedence, the TOML file, every setting and its default."""
    rows = [
        (f.name, env_name(f.name), render(default_of(f)))
        for f in fields(Settings)
        if f.name != "extra"
    ]
    width_name = max(len(r[0]) for r in rows)
    width_env = max(len(r[1]) for r in rows)
    lines = [
        "Settings, highest precedence first: command-line flags, then REDWIRE_* environment",
        "variables, then a TOML file (--config FILE or REDWIRE_CONFIG=FILE; keys in a",
        "[redwire] table, e.g. `port = 9000`; topic rules as [[redwire.topics]] tables), then",
        "the defaults below. In the environment `none` means unset (off), lists are",
        "comma-separated, and REDWIRE_TOPICS is a JSON list of objects.",
        "`redwire check-config` prints the effective settings and where each came from.",
        "",
        f"  {'setting':<{width_name}}  {'environment':<{width_env}}  default",
    ]
    lines += [f"  {n:<{width_name}}  {e:<{width_env}}  {d}" for n, e, d in rows]
    return "\n".join(lines)


def mask(name: str, value: Any) -> Any:
    """`value` with its secret parts replaced by ***."""
    if value is None:
        return None
    if name in _SECRETS and value != ():
        return MASK
    if name == "redis_url" and isinstance(value, str):  # broker.settings.mask_url
        return mask_url(value)
    return value


@dataclass(frozen=True, slots=True)
class Effective:
    """One setting as `serve` would run with it."""

    name: str
    value: Any  # already masked
    source: str  # "default", "toml FILE", "env REDWIRE_X", "flag"


def _toml_keys(path: str) -> set[str]:
    """The keys a TOML file sets (its [redwire] table, or the top level without one)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return set()  # Settings.load reports it
    section = data.get("redwire", data)
    return set(section) if isinstance(section, dict) else set()


def effective_settings(
    *,
    toml_path: str | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any],
    flag_names: Mapping[str, str] | None = None,
) -> tuple[Settings, list[Effective]]:
    """Load settings as `serve` does and say where each value came from.

    `flag_names` maps a setting to the flag that set it (for the source column).
    Raises ConfigError for an invalid configuration."""
    settings = Settings.load(toml_path=toml_path, environ=environ, overrides=overrides)
    path = toml_path or environ.get(CONFIG_ENV)
    in_toml = _toml_keys(path) if path else set()
    flags = flag_names or {}
    rows = []
    for f in fields(Settings):
        if f.name in overrides and overrides[f.name] is not None:
            source = f"flag {flags[f.name]}" if f.name in flags else "flag"
        elif f.name != "extra" and env_name(f.name) in environ:
            source = f"env {env_name(f.name)}"
        elif f.name in in_toml:
            source = f"toml {path}"
        elif f.name == "api_key" and settings.api_key_file is not None:
            source = "api_key_file"  # read from that file when the settings were made
        elif f.name == "jwt_secrets" and settings.jwt_secret_file is not None:
            source = "jwt_secret_file"
        else:
            source = "default"
        rows.append(Effective(f.name, mask(f.name, getattr(settings, f.name)), source))
    return settings, rows


def check_config(
    out: TextIO,
    err: TextIO,
    *,
    toml_path: str | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any],
    flag_names: Mapping[str, str] | None = None,
) -> int:
    """`redwire check-config`: one `name = value  # source` line per setting; 0, or 2 with the
    error on `err` for an invalid configuration."""
    try:
        _, rows = effective_settings(
            toml_path=toml_path, environ=environ, overrides=overrides, flag_names=flag_names
        )
    except ConfigError as exc:
        print(f"redwire: invalid configuration: {exc}", file=err)
        return 2
    width = max(len(f"{r.name} = {render(r.value)}") for r in rows)
    for r in rows:
        line = f"{r.name} = {render(r.value)}"
        print(f"{line:<{width}}  # {r.source}", file=out)
    return 0
