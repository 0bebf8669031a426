"""One frozen object holding every setting and limit, and the one place that reads them.

Precedence, lowest first: defaults here, an optional TOML file, `REDWIRE_*` environment
variables, command-line flags. Units are in the names (`_bytes`, `_s`); `None` means "off"
where a field's comment says so.

Per-topic features (history, presence) come from `topics`, a tuple of `TopicRule`s: in TOML
an array of tables `[[redwire.topics]]`, in the environment `REDWIRE_TOPICS` as a JSON list
of objects with the same keys. `Settings.rule_for(topic)` returns the first rule whose
pattern matches (`*` matches any characters), or None.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import ipaddress
import json
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ConfigError

ENV_PREFIX = "REDWIRE_"
_BUS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel", "memory")
KIB = 1024
MIB = 1024 * 1024
_HOST_RE = r"(\[[0-9a-f:.]+\]|[^\s/?#@:\[\]]+)(:[0-9]{1,5})?"  # host[:port], [v6][:port]
# An `allowed_origins` entry: a serialised origin (RFC 6454 section 6.2), no path, no slash.
_ORIGIN_ENTRY_RE = re.compile(r"[a-z][a-z0-9+.-]*://" + _HOST_RE, re.I)
_HOST_ENTRY_RE = re.compile(r"\.?" + _HOST_RE, re.I)  # an `allowed_hosts` entry
_METRICS_LISTEN_RE = re.compile(r"(\[[0-9a-f:.]+\]|[^\s/?#@:\[\]]+):[0-9]{1,5}", re.I)


@dataclass(frozen=True, slots=True)
class TopicRule:
    """What topics matching `pattern` get beyond plain pub/sub (docs/protocol.md)."""

    pattern: str  # fnmatch-style, case-sensitive: `*` any characters, `?` one
    history_size: int = 0  # messages kept per topic; 0: no history, no offsets
    history_ttl_s: float = 0.0  # history entries older than this are dropped; 0: no age bound
    presence: bool = False  # the bus keeps who is subscribed (`Bus.presence`)
    join_leave: bool = False  # presence changes are announced to subscribers; needs presence
    # Who may subscribe / publish / ask `presence` (broker/auth.py): "any" (anonymous too),
    # "authenticated" (a verified token), "claim" (a token whose subs/pubs claim lists the
    # topic), "none". A token's subs/pubs claims narrow any of them; hooks run after.
    allow_subscribe: str = "any"
    allow_publish: str = "any"
    allow_presence: str = "any"
    allow_browser_publish: bool = True  # False: a connection whose upgrade had Origin may not


_RULE_KEYS = frozenset(f.name for f in fields(TopicRule))
_ACCESS_LEVELS = ("any", "authenticated", "claim", "none")  # broker/auth.py ACCESS_LEVELS


@dataclass(frozen=True, slots=True)
class Settings:
    # --- listening and processes ---
    host: str = "127.0.0.1"
    port: int = 8765
    workers: int = 0  # 0 means one per CPU this process may use (affinity, cgroup quota)
    redis_url: str | None = None  # None: the supervisor starts an embedded redis-server
    redis_server_path: str | None = None  # None: look for `redis-server` on PATH
    app: str | None = None  # "module:object" application hooks, None for none
    api_key: str | None = None  # POST /publish needs it; None disables POST /publish
    # A file holding the API key (stripped), so the key is in neither argv nor the environment;
    # read when the settings are made. Settings.load refuses it together with api_key.
    api_key_file: str | None = None
    static_dir: str | None = None  # an application's web files, served at / (None: the demo)
    # Browsers' `Origin` (docs/security.md): a request without one (not a browser) passes; one
    # from the same host:port as the request's Host passes; so does one listed here. "*" lets
    # any site connect (unsafe with cookie auth); "null" admits sandboxed pages and file://.
    allowed_origins: tuple[str, ...] = ()  # (): the same origin only; entries scheme://host[:port]
    # Host headers served (every HTTP request and upgrade; another one: 421). An entry is a
    # name (any port), name:port, or .name for the name and its subdomains. (): any Host.
    allowed_hosts: tuple[str, ...] = ()
    # TLS (broker/tls.py): with a certificate, the port serves wss:// and https:// only.
    certfile: str | None = None  # PEM: the certificate, then its chain; None: plain ws/http
    keyfile: str | None = None  # PEM private key; None: it is in certfile
    # Clients' real addresses behind a load balancer (docs/security.md). A connection from an
    # address in these networks (CIDR or address) may name the client: with proxy_protocol,
    # in a PROXY protocol v1/v2 header; without it, in X-Forwarded-For. (): trust none.
    trusted_proxies: tuple[str, ...] = ()
    proxy_protocol: bool = False  # every connection starts with a PROXY header (HAProxy)
    # /metrics on its own host:port (e.g. 127.0.0.1:9100), off the public port; None: on it.
    metrics_listen: str | None = None
    log_level: str = "INFO"

    # --- opening handshake (HTTP/1.1) ---
    handshake_timeout_s: float = 10.0
    max_request_line_bytes: int = 8 * KIB
    max_header_bytes: int = 16 * KIB  # all header lines together
    max_headers: int = 100
    max_http_body_bytes: int = 1 * MIB  # POST /publish bodies

    # --- WebSocket limits and timers ---
    max_message_bytes: int = 1 * MIB  # after reassembly and decompression
    # Bytes all of a worker's WebSockets may hold for frames and messages not complete yet
    # (a stalled half-sent message holds what it sent). A connection whose partial input
    # would pass it is closed 1013. None: no cap beyond max_message_bytes per connection.
    max_partial_input_bytes_per_worker: int | None = 256 * MIB
    ping_interval_s: float | None = 20.0  # protocol-level keepalive ping; None disables
    ping_timeout_s: float = 20.0  # no pong within this: close 1011 and drop
    close_timeout_s: float = 5.0  # wait this long for the peer's close frame, then drop
    compression: bool = True  # offer/accept permessage-deflate (RFC 7692)
    compression_level: int = 6
    compression_min_bytes: int = 128  # smaller messages are sent uncompressed
    max_window_bits: int = 15  # our window for compression, 9..15

    # --- transport back-pressure ---
    write_buffer_high_bytes: int = 256 * KIB
    write_buffer_low_bytes: int = 64 * KIB
    max_send_buffer_bytes: int = 4 * MIB  # a client further behind: slow consumer (1013);
    # at least 2 x write_buffer_high_bytes
    slow_consumer_policy: str = "close"  # "close" (1013)
    coalesce_window_s: float = 0.002  # a busy hub writes to a subscriber at most this often

    # --- fairness: one connection's input is handled in slices (worker/protocol.py) ---
    read_slice_bytes: int = 16 * KIB  # most received bytes parsed per turn of the loop
    read_slice_messages: int = 16  # most messages handled per turn; the rest waits a turn

    # --- pub/sub protocol ---
    max_topic_bytes: int = 200
    max_data_depth: int = 64  # published data nested deeper (arrays/objects) is refused
    max_subscriptions_per_connection: int = 1000
    max_queued_requests: int = 256  # requests waiting behind a slow one; more: stop reading
    # Publishes one connection has on their way to Redis; more: stop reading it until some
    # are answered. Small, so a flooding connection's publishes queue in its own socket, not
    # ahead of everybody's in the worker's one publisher pipeline (fairness).
    max_publishes_in_flight: int = 16
    max_errors_per_window: int = 20  # more error replies than this in the window: close 1008
    error_window_s: float = 10.0
    heartbeat_interval_s: float = 25.0  # clients send an app-level {"op":"ping"} this often
    heartbeat_timeout_s: float = 10.0  # no frame this long after a client ping: it reconnects

    # --- abuse limits (docs/security.md) ---
    # Publishes per connection: a token bucket refilled at this rate (None: no limit); over
    # it a publish gets `rate_limited` with `retry_after` (seconds), never a close.
    publish_rate_per_s: float | None = 10000.0
    publish_burst: int = 20000  # the bucket's size: publishes allowed at once from full
    # Open WebSockets per worker (over it the upgrade gets 503) and per client IP address,
    # the TCP peer's (429). None: no cap.
    max_connections_per_worker: int | None = 10000
    # WebSocket upgrades a worker accepts per second (a token bucket; over it: 503 with
    # Retry-After), so a connection flood cannot starve the clients already connected.
    connection_rate_per_s: float | None = 2000.0  # None: no limit
    connection_burst: int = 4000  # upgrades accepted at once from a full bucket
    max_connections_per_ip: int | None = 1000
    # A WebSocket that sends nothing (no frame, no ping, no pong) this long while it is
    # subscribed to nothing and has no request pending is closed 1008 "idle". None: never.
    idle_timeout_s: float | None = 300.0

    # --- connection tokens (JWT; broker/auth.py, docs/security.md "Authentication") ---
    # Any key turns verification on. HS* secrets (several: rotation, any may have signed), or
    # jwt_secret_file (one per line, read when the settings are made: never in argv/environ).
    jwt_secrets: tuple[str, ...] = ()
    jwt_secret_file: str | None = None
    jwt_public_key_file: str | None = None  # PEM public key (RSA, EC, Ed25519) for RS/PS/ES/EdDSA
    jwt_jwks: str | None = None  # a JWKS: a file path, or an http(s):// URL each worker fetches
    jwt_jwks_refresh_s: float = 300.0  # read or fetch the JWKS again this often
    # A token naming an unknown `kid` makes the JWKS load again now, at most this often.
    jwt_jwks_min_refresh_s: float = 30.0
    jwt_jwks_timeout_s: float = 5.0  # one JWKS fetch; a failed one keeps the keys it has
    jwt_jwks_max_bytes: int = 1 * MIB  # a larger JWKS document is refused
    jwt_algorithms: tuple[str, ...] = ()  # pinned; (): HS256 with secrets, RS256 with keys
    jwt_audience: str | None = None  # when set, tokens need this `aud`
    jwt_issuer: str | None = None  # when set, tokens need this `iss`
    jwt_leeway_s: float = 5.0  # clock skew allowed on exp/nbf/iat
    jwt_require_exp: bool = True  # refuse tokens without `exp`
    # Before a token's exp the server asks for a new one ({"op":"refresh"}) this long ahead;
    # none by exp (+ leeway): close 4001.
    token_refresh_margin_s: float = 30.0
    allow_anonymous: bool | None = None  # connect without a token; None: only with no JWT key

    # --- bus ---
    bus_reconnect_min_s: float = 0.05
    bus_reconnect_max_s: float = 5.0
    bus_probe_interval_s: float = 2.0  # idle subscription probe; see docs/architecture.md
    bus_probe_timeout_s: float = 5.0
    bus_resubscribe_batch: int = 500
    bus_publish_timeout_s: float = 5.0
    bus_connect_timeout_s: float = 5.0  # connect + handshake + resubscribe of one connection
    bus_publish_batch: int = 256  # most PUBLISH commands in one pipeline round trip
    bus_read_batch: int = 1000  # most messages handed to the hub before yielding to the loop
    bus_cluster_refresh_s: float = 5.0  # Redis Cluster: the slot map is checked this often
    channel_prefix: str = "redwire:"  # Redis channel of topic T: channel_prefix + "t:" + T

    # --- history, idempotency, presence (per-topic rules; see TopicRule) ---
    topics: tuple[TopicRule, ...] = ()  # first matching rule wins; none: plain pub/sub
    idempotency_ttl_s: float = 300.0  # a publish key is remembered this long
    presence_ttl_s: float = 10.0  # a dead worker's clients leave presence within this
    history_read_limit: int = 10000  # most messages one history read returns (bus default)
    history_page_size: int = 200  # a replay or gap repair reads history in pages of this many
    max_held_messages: int = 10000  # live messages kept while a topic's gap is repaired

    # --- supervisor ---
    drain_timeout_s: float = 10.0  # SIGTERM: clients get close 1001, workers exit within this
    worker_restart_delay_s: float = 0.5
    worker_restart_max_delay_s: float = 30.0  # backoff cap for a worker that keeps dying
    worker_stable_after_s: float = 10.0  # a worker up this long restarts without backoff
    listen_backlog: int = 1024  # pending TCP connections the kernel queues per listener
    reuse_port: bool = True  # workers listen with SO_REUSEPORT; False: one inherited socket
    embedded_redis_start_timeout_s: float = 10.0
    worker_start_timeout_s: float = 30.0  # a worker not listening by then fails the start
    kill_grace_s: float = 2.0  # after drain_timeout_s, a worker still running is killed this late
    metrics_dir: str | None = None  # prometheus multiprocess dir; None: supervisor makes one

    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form, for application hooks

    def __post_init__(self) -> None:
        _validate(self)
        if self.api_key_file is not None and self.api_key is None:
            object.__setattr__(self, "api_key", _read_secret("api_key_file", self.api_key_file))
        if self.jwt_secret_file is not None and not self.jwt_secrets:
            secrets = _read_secret("jwt_secret_file", self.jwt_secret_file).splitlines()
            secrets_t = tuple(line.strip() for line in secrets if line.strip())
            object.__setattr__(self, "jwt_secrets", secrets_t)
        if self.jwt_secrets or self.jwt_public_key_file is not None or self.jwt_jwks:
            from broker.auth import check_settings  # keys readable, algorithms fit the keys

            check_settings(self)

    @property
    def anonymous_allowed(self) -> bool:
        """Whether a connection without a token is accepted (`allow_anonymous`)."""
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return not (self.jwt_secrets or self.jwt_public_key_file is not None or self.jwt_jwks)

    def __repr__(self) -> str:
        """Every field, with the API key hidden and a password in redis_url masked."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "api_key" and value is not None:
                value = "***"
            elif f.name == "jwt_secrets" and value:
                value = ("***",) * len(value)
            elif f.name == "redis_url" and value is not None:
                value = mask_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def rule_for(self, topic: str) -> TopicRule | None:
        """The first rule whose pattern matches `topic`, or None (plain pub/sub)."""
        if not self.topics:
            return None
        return _rule_for(self.topics, topic)

    @property
    def max_data_bytes(self) -> int:
        """Largest encoded `data` a publish may carry: its `message` frame, with the topic
        and the protocol's fields around it, must still fit in max_message_bytes."""
        return self.max_message_bytes - self.max_topic_bytes - 256

    @classmethod
    def load(
        cls,
        *,
        toml_path: str | None = None,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from defaults < TOML file < environment < explicit overrides."""
        values: dict[str, Any] = {}
        env = os.environ if environ is None else environ
        _check_environment(env)
        toml_path = toml_path or env.get(ENV_PREFIX + "CONFIG")
        if toml_path:
            values.update(_read_toml(toml_path))
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env and f.name != "extra":
                values[f.name] = _coerce(f.name, env[key])
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        unknown = set(values) - _FIELD_NAMES
        if unknown:
            raise ConfigError(
                "unknown setting(s): "
                + ", ".join(_suggest(n, _FIELD_NAMES) for n in sorted(unknown))
            )
        coerced = {k: _coerce(k, v) for k, v in values.items()}
        if coerced.get("api_key") is not None and coerced.get("api_key_file") is not None:
            raise ConfigError("api_key and api_key_file are both set: use one (api_key_file)")
        if coerced.get("jwt_secrets") and coerced.get("jwt_secret_file") is not None:
            raise ConfigError(
                "jwt_secrets and jwt_secret_file are both set: use one (jwt_secret_file)"
            )
        return cls(**coerced)

    def to_env(self) -> dict[str, str]:
        """The environment that makes `Settings.load()` in a child process rebuild these."""
        env: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if f.name == "api_key" and self.api_key_file is not None:
                value = None  # the child reads the file itself: the key stays out of environ
            if f.name == "jwt_secrets" and self.jwt_secret_file is not None:
                value = ()  # the same: the child reads jwt_secret_file
            if value is None:
                value = "none"
            elif f.name == "topics":
                value = json.dumps([dataclasses.asdict(rule) for rule in value])
            elif isinstance(value, tuple):
                value = ",".join(value)
            env[ENV_PREFIX + f.name.upper()] = str(value)
        return env


_FIELD_NAMES = frozenset(f.name for f in fields(Settings))
# REDWIRE_* variables that are not settings but are the project's own: the TOML file's path,
# the instance name the supervisor gives its workers, the browser the e2e tests drive.
ENV_NOT_SETTINGS = frozenset(ENV_PREFIX + name for name in ("CONFIG", "INSTANCE", "CHROMIUM"))


def _suggest(name: str, candidates: frozenset[str], prefix: str = "") -> str:
    """`name`, with the closest candidate as a hint when one is close enough."""
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"{prefix}{name} (did you mean {prefix}{close[0]}?)" if close else f"{prefix}{name}"


def _check_environment(env: Mapping[str, str]) -> None:
    """Refuse a REDWIRE_* variable that names no setting: a typo would be ignored silently."""
    known = {f.upper() for f in _FIELD_NAMES}
    unknown = sorted(
        key[len(ENV_PREFIX) :]
        for key in env
        if key.startswith(ENV_PREFIX)
        and key not in ENV_NOT_SETTINGS
        and key[len(ENV_PREFIX) :] not in known
    )
    if unknown:
        hints = ", ".join(_suggest(name, frozenset(known), ENV_PREFIX) for name in unknown)
        raise ConfigError(f"unknown environment variable(s): {hints}")


def mask_url(url: str) -> str:
    """`url` fit for a log line: a password in its userinfo (`redis://:secret@h:6379/0` ->
    `redis://:***@h:6379/0`; a bare `secret@` too) or in a `password=` query parameter
    becomes `***`. Never raises: a URL that cannot be parsed is shown as `scheme://***`."""
    try:
        parts = urlsplit(url)
        netloc, query = parts.netloc, parts.query
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
        if query:
            pairs = [pair.partition("=") for pair in query.split("&")]
            query = "&".join(
                f"{k}{eq}***" if k.lower() == "password" and eq else f"{k}{eq}{v}"
                for k, eq, v in pairs
            )
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        # By hand: urlunsplit would turn unix:///path into unix:/path.
        masked = f"{parts.scheme}://{netloc}{parts.path}"
        return (
            masked
            + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else "")
        )
    except ValueError:
        return url.partition("://")[0] + "://***"


def _read_secret(name: str, path: str) -> str:
    """The secret in file `path`, whitespace stripped; ConfigError if unreadable or empty."""
    try:
        with open(path, encoding="utf-8") as fh:
            secret = fh.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"setting {name}: cannot read {path}: {reason}") from None
    if not secret:
        raise ConfigError(f"setting {name}: {path} is empty")
    return secret


@functools.lru_cache(maxsize=65536)
def _rule_for(rules: tuple[TopicRule, ...], topic: str) -> TopicRule | None:
    for rule in rules:
        if fnmatch.fnmatchcase(topic, rule.pattern):
            return rule
    return None


def _topic_rules(value: Any) -> tuple[TopicRule, ...]:
    """TopicRules from a JSON text (environment), a list of tables (TOML) or TopicRules."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError as exc:
            raise ConfigError(f"setting topics: not a JSON list of objects ({exc})") from None
    if not isinstance(value, list | tuple):
        raise ConfigError("setting topics: must be a list of tables/objects")
    rules = []
    for i, item in enumerate(value):
        if isinstance(item, TopicRule):
            rules.append(item)
            continue
        if not isinstance(item, Mapping):
            raise ConfigError(f"setting topics[{i}]: must be a table/object")
        unknown = set(item) - _RULE_KEYS
        if unknown:
            raise ConfigError(f"setting topics[{i}]: unknown key(s) {', '.join(sorted(unknown))}")
        if not isinstance(item.get("pattern"), str):
            raise ConfigError(f"setting topics[{i}]: `pattern` (a string) is required")
        kinds = {
            "history_size": int,
            "history_ttl_s": float,
            "presence": bool,
            "join_leave": bool,
            "allow_subscribe": str,
            "allow_publish": str,
            "allow_presence": str,
            "allow_browser_publish": bool,
        }
        values: dict[str, Any] = {"pattern": item["pattern"]}
        for key, kind in kinds.items():
            if key not in item:
                continue
            v = item[key]
            ok = type(v) is kind or (kind is float and type(v) is int)
            if not ok:
                raise ConfigError(f"setting topics[{i}].{key}: expected {kind.__name__}, got {v!r}")
            values[key] = float(v) if kind is float else v
        rules.append(TopicRule(**values))
    return tuple(rules)


_HINTS: dict[str, Any] = {}


def _field_type(name: str) -> Any:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(Settings))
    return _HINTS[name]


def _coerce(name: str, value: Any) -> Any:
    """Turn a TOML or environment value into the field's type, or raise ConfigError."""
    if name not in {f.name for f in fields(Settings)}:
        raise ConfigError(f"unknown setting: {name}")
    hint = _field_type(name)
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    # "none" means None; "" does too, except for lists, where it is the empty list.
    empty = ("none",) if origin is tuple else ("", "none")
    if value is None or (optional and isinstance(value, str) and value.lower() in empty):
        if optional:
            return None
        raise ConfigError(f"setting {name} cannot be empty")
    if name == "topics":
        return _topic_rules(value)
    try:
        if origin is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool | float):
                raise ValueError("not an integer")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError("not a number")
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: cannot use {value!r} ({exc})") from None
    return value


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    section = data.get("redwire", data)
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: [redwire] must be a table")
    return dict(section)


def _validate(s: Settings) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(0 <= s.port <= 65535, f"port must be 0..65535, got {s.port}")
    need(s.workers >= 0, "workers must be >= 0 (0 = one per CPU)")
    need(s.max_message_bytes >= 125, "max_message_bytes must be >= 125")
    need(
        s.max_partial_input_bytes_per_worker is None
        or s.max_partial_input_bytes_per_worker >= s.max_message_bytes,
        "max_partial_input_bytes_per_worker must be >= max_message_bytes (none: no cap)",
    )
    need(9 <= s.max_window_bits <= 15, "max_window_bits must be 9..15")
    need(-1 <= s.compression_level <= 9, "compression_level must be -1..9")
    need(
        0 <= s.write_buffer_low_bytes <= s.write_buffer_high_bytes,
        "write_buffer_low_bytes must be <= write_buffer_high_bytes",
    )
    need(
        s.max_send_buffer_bytes >= 2 * s.write_buffer_high_bytes,
        "max_send_buffer_bytes must be at least twice write_buffer_high_bytes (the transport"
        " holds up to the high water mark; the rest of the cap queues in the outbox)",
    )
    need(s.max_data_bytes >= 1, "max_message_bytes must exceed max_topic_bytes + 256")
    need(0 <= s.coalesce_window_s <= 0.1, "coalesce_window_s must be 0..0.1")
    need(s.slow_consumer_policy in ("close",), "slow_consumer_policy must be 'close'")
    need(1 <= s.max_topic_bytes <= 1024, "max_topic_bytes must be 1..1024")
    need(s.max_queued_requests >= 1, "max_queued_requests must be >= 1")
    need(s.max_publishes_in_flight >= 1, "max_publishes_in_flight must be >= 1")
    need(s.read_slice_bytes >= 1024, "read_slice_bytes must be >= 1024")
    need(s.read_slice_messages >= 1, "read_slice_messages must be >= 1")
    need(s.listen_backlog >= 1, "listen_backlog must be >= 1")
    need(
        s.publish_rate_per_s is None or s.publish_rate_per_s > 0,
        "publish_rate_per_s must be > 0 (none: no limit)",
    )
    need(s.publish_burst >= 1, "publish_burst must be >= 1")
    need(
        s.connection_rate_per_s is None or s.connection_rate_per_s > 0,
        "connection_rate_per_s must be > 0 (none: no limit)",
    )
    need(s.connection_burst >= 1, "connection_burst must be >= 1")
    for name in ("max_connections_per_worker", "max_connections_per_ip"):
        value = getattr(s, name)
        need(value is None or value >= 1, f"{name} must be >= 1 (none: no cap)")
    need(s.idle_timeout_s is None or s.idle_timeout_s > 0, "idle_timeout_s must be > 0")
    need(s.ping_interval_s is None or s.ping_interval_s > 0, "ping_interval_s must be > 0")
    for name in ("handshake_timeout_s", "ping_timeout_s", "close_timeout_s", "drain_timeout_s"):
        need(getattr(s, name) > 0, f"{name} must be > 0")
    need(s.max_headers > 0 and s.max_header_bytes > 0, "header limits must be > 0")
    need(s.bus_reconnect_min_s > 0, "bus_reconnect_min_s must be > 0")
    need(s.bus_reconnect_max_s >= s.bus_reconnect_min_s, "bus_reconnect_max_s < min")
    for name in (
        "bus_probe_interval_s",
        "bus_probe_timeout_s",
        "bus_publish_timeout_s",
        "bus_connect_timeout_s",
        "bus_cluster_refresh_s",
    ):
        need(getattr(s, name) > 0, f"{name} must be > 0")
    for name in ("bus_resubscribe_batch", "bus_publish_batch", "bus_read_batch"):
        need(getattr(s, name) >= 1, f"{name} must be >= 1")
    need(
        0 < len(s.channel_prefix) <= 64 and s.channel_prefix.isprintable(),
        "channel_prefix must be 1..64 printable characters",
    )
    need(
        s.redis_url is None or s.redis_url.split("://", 1)[0] in _BUS_SCHEMES,
        f"redis_url must start with one of {', '.join(x + '://' for x in _BUS_SCHEMES)}",
    )
    for name in ("idempotency_ttl_s", "presence_ttl_s"):
        need(getattr(s, name) > 0, f"{name} must be > 0")
    for name in ("history_read_limit", "history_page_size", "max_held_messages"):
        need(getattr(s, name) >= 1, f"{name} must be >= 1")
    need(1 <= s.max_data_depth <= 512, "max_data_depth must be 1..512")
    need(isinstance(s.topics, tuple), "topics must be a tuple of TopicRule")
    jwt_keys = bool(s.jwt_secrets or s.jwt_secret_file or s.jwt_public_key_file or s.jwt_jwks)
    for name in ("jwt_jwks_refresh_s", "jwt_jwks_timeout_s", "token_refresh_margin_s"):
        need(getattr(s, name) > 0, f"{name} must be > 0")
    need(0 <= s.jwt_leeway_s <= 300, "jwt_leeway_s must be 0..300 (seconds)")
    need(
        s.jwt_jwks_min_refresh_s >= 1,
        "jwt_jwks_min_refresh_s must be >= 1 (seconds): tokens naming made-up kids would"
        " make every upgrade fetch the JWKS",
    )
    if s.jwt_jwks and not s.jwt_jwks.startswith(("https://", "http://")):
        need(os.path.isfile(s.jwt_jwks), f"jwt_jwks: {s.jwt_jwks} is not a file nor an http(s) URL")
    need(s.jwt_jwks_max_bytes >= 1024, "jwt_jwks_max_bytes must be >= 1024")
    need(
        not s.jwt_algorithms or jwt_keys,
        "jwt_algorithms is set but no JWT key is (jwt_secret_file, jwt_public_key_file, jwt_jwks)",
    )
    need(
        s.allow_anonymous is not False or jwt_keys,
        "allow_anonymous = false needs JWT keys: otherwise nobody could connect",
    )
    for i, rule in enumerate(s.topics):
        need(isinstance(rule, TopicRule), f"topics[{i}] must be a TopicRule")
        need(bool(rule.pattern), f"topics[{i}]: pattern must not be empty")
        need(rule.history_size >= 0, f"topics[{i}]: history_size must be >= 0")
        need(rule.history_ttl_s >= 0, f"topics[{i}]: history_ttl_s must be >= 0")
        need(rule.presence or not rule.join_leave, f"topics[{i}]: join_leave needs presence")
        for action in ("subscribe", "publish", "presence"):
            access = getattr(rule, f"allow_{action}")
            need(
                access in _ACCESS_LEVELS,
                f"topics[{i}].allow_{action}: {access!r} is not one of {', '.join(_ACCESS_LEVELS)}",
            )
            need(
                access in ("any", "none") or jwt_keys,
                f"topics[{i}].allow_{action} = {access!r} needs JWT keys (jwt_secret_file,"
                " jwt_public_key_file or jwt_jwks): without them no client has a token",
            )
    need(
        s.keyfile is None or s.certfile is not None,
        "keyfile needs certfile (the certificate it is the key of)",
    )
    need(isinstance(s.trusted_proxies, tuple), "trusted_proxies must be a tuple of networks")
    for entry in s.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            need(False, f"trusted_proxies: {entry!r} is not an address or a network (CIDR)")
    need(
        not s.proxy_protocol or bool(s.trusted_proxies),
        "proxy_protocol needs trusted_proxies (the load balancers' addresses)",
    )
    need(
        not (s.proxy_protocol and s.certfile),
        "proxy_protocol with certfile: the PROXY header comes before TLS, which this server"
        " does not read; terminate TLS at the load balancer or drop proxy_protocol",
    )
    if s.metrics_listen is not None:
        need(
            _METRICS_LISTEN_RE.fullmatch(s.metrics_listen) is not None,
            f"metrics_listen: {s.metrics_listen!r} is not host:port (e.g. 127.0.0.1:9100)",
        )
    need(s.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "bad log_level")
    need(isinstance(s.allowed_origins, tuple), "allowed_origins must be a tuple of origins")
    for entry in s.allowed_origins:
        need(
            entry in ("*", "null") or _ORIGIN_ENTRY_RE.fullmatch(entry) is not None,
            f"allowed_origins: {entry!r} is not an origin: scheme://host[:port] with no path"
            " (e.g. https://app.example), '*' (any site: unsafe) or 'null'",
        )
    need(isinstance(s.allowed_hosts, tuple), "allowed_hosts must be a tuple of host names")
    for entry in s.allowed_hosts:
        need(
            _HOST_ENTRY_RE.fullmatch(entry) is not None,
            f"allowed_hosts: {entry!r} is not a host: name, name:port or .name (subdomains)",
        )
