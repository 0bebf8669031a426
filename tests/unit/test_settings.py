"""broker.settings: defaults, precedence (TOML < environment < overrides), validation, to_env."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from broker.errors import ConfigError
from broker.settings import ENV_NOT_SETTINGS, ENV_PREFIX, Settings, TopicRule, mask_url


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "redwire.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_valid_and_loadable_from_nothing() -> None:
    s = Settings()
    assert Settings.load(environ={}) == s
    assert s.max_data_bytes > 0
    assert 0 < s.write_buffer_low_bytes <= s.write_buffer_high_bytes
    assert s.ping_interval_s is not None


def test_settings_are_frozen_and_replace_validates() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    assert s.replace(port=9000).port == 9000
    with pytest.raises(ConfigError, match="port"):
        s.replace(port=70000)


# --- precedence ------------------------------------------------------------------------------


def test_precedence_toml_env_overrides(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        'port = 1111\nhost = "0.0.0.0"\nmax_topic_bytes = 50\nlog_level = "DEBUG"\n',
    )
    env = {"REDWIRE_PORT": "2222", "REDWIRE_MAX_TOPIC_BYTES": "60"}
    s = Settings.load(toml_path=path, environ=env, overrides={"port": 3333, "host": None})
    assert s.port == 3333  # overrides beat the environment
    assert s.max_topic_bytes == 60  # the environment beats the file
    assert s.host == "0.0.0.0"  # an override of None means "not given"
    assert s.log_level == "DEBUG"  # the file beats the defaults
    assert s.workers == Settings().workers


def test_toml_path_from_environment(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 4444\n")
    assert Settings.load(environ={"REDWIRE_CONFIG": path}).port == 4444


def test_toml_with_redwire_table(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        "[redwire]\nport = 5555\nping_interval_s = 1.5\n"
        'allowed_origins = ["https://a.example", "https://b.example"]\n'
        "compression = false\n",
    )
    s = Settings.load(toml_path=path, environ={})
    assert s.port == 5555
    assert s.ping_interval_s == 1.5
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert s.compression is False


def test_toml_without_table(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'port = 6666\nredis_url = "redis://127.0.0.1:6379/0"\n')
    s = Settings.load(toml_path=path, environ={})
    assert s.port == 6666
    assert s.redis_url == "redis://127.0.0.1:6379/0"


def test_toml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.load(toml_path=str(tmp_path / "missing.toml"), environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(toml_path=write_toml(tmp_path, "port = = 1"), environ={})
    with pytest.raises(ConfigError, match="table"):
        Settings.load(toml_path=write_toml(tmp_path, 'redwire = "x"\n'), environ={})


def test_environment_types() -> None:
    env = {
        "REDWIRE_PORT": "8000",
        "REDWIRE_COMPRESSION": "off",
        "REDWIRE_PING_INTERVAL_S": "none",
        "REDWIRE_CLOSE_TIMEOUT_S": "0.25",
        "REDWIRE_ALLOWED_ORIGINS": "https://a.example, https://b.example",
        "REDWIRE_API_KEY": "secret",
        "REDWIRE_EXTRA": "ignored: extra is for application hooks",
        "UNRELATED": "1",
    }
    s = Settings.load(environ=env)
    assert s.port == 8000
    assert s.compression is False
    assert s.ping_interval_s is None
    assert s.close_timeout_s == 0.25
    assert s.allowed_origins == ("https://a.example", "https://b.example")
    assert s.api_key == "secret"
    assert s.extra == {}


@pytest.mark.parametrize("text", ["1", "true", "YES", "on", " True "])
def test_bool_true_spellings(text: str) -> None:
    assert Settings.load(environ={"REDWIRE_COMPRESSION": text}).compression is True


@pytest.mark.parametrize("text", ["0", "false", "No", "OFF"])
def test_bool_false_spellings(text: str) -> None:
    assert Settings.load(environ={"REDWIRE_COMPRESSION": text}).compression is False


# --- bad values: ConfigError naming the field ------------------------------------------------

BAD: list[tuple[str, dict[str, str], str, str]] = [
    # (id, environment, TOML line, the field named in the message)
    ("negative-port", {"REDWIRE_PORT": "-1"}, "port = -1", "port"),
    ("port-too-big", {"REDWIRE_PORT": "65536"}, "port = 65536", "port"),
    ("window-bits-8", {"REDWIRE_MAX_WINDOW_BITS": "8"}, "max_window_bits = 8", "max_window_bits"),
    (
        "low-above-high",
        {"REDWIRE_WRITE_BUFFER_LOW_BYTES": "2000", "REDWIRE_WRITE_BUFFER_HIGH_BYTES": "1000"},
        "write_buffer_low_bytes = 2000\nwrite_buffer_high_bytes = 1000",
        "write_buffer_low_bytes",
    ),
    (
        "send-buffer-under-twice-the-high-water-mark",
        {"REDWIRE_MAX_SEND_BUFFER_BYTES": "300000"},  # the high water mark is 256 KiB
        "max_send_buffer_bytes = 300000",
        "max_send_buffer_bytes",
    ),
    ("data-depth-0", {"REDWIRE_MAX_DATA_DEPTH": "0"}, "max_data_depth = 0", "max_data_depth"),
    (
        "history-page-0",
        {"REDWIRE_HISTORY_PAGE_SIZE": "0"},
        "history_page_size = 0",
        "history_page_size",
    ),
    ("bad-bool", {"REDWIRE_COMPRESSION": "maybe"}, 'compression = "maybe"', "compression"),
    ("bad-int", {"REDWIRE_PORT": "eighty"}, 'port = "eighty"', "port"),
    ("bool-for-int", {"REDWIRE_WORKERS": "true"}, "workers = true", "workers"),
    ("bad-float", {"REDWIRE_PING_TIMEOUT_S": "soon"}, 'ping_timeout_s = "soon"', "ping_timeout_s"),
    ("zero-timeout", {"REDWIRE_CLOSE_TIMEOUT_S": "0"}, "close_timeout_s = 0", "close_timeout_s"),
    ("bad-scheme", {"REDWIRE_REDIS_URL": "http://x"}, 'redis_url = "http://x"', "redis_url"),
    ("bad-log-level", {"REDWIRE_LOG_LEVEL": "LOUD"}, 'log_level = "LOUD"', "log_level"),
]


@pytest.mark.parametrize(("env", "field"), [(b[1], b[3]) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_environment_value(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Settings.load(environ=env)


@pytest.mark.parametrize(("line", "field"), [(b[2], b[3]) for b in BAD], ids=[b[0] for b in BAD])
def test_bad_toml_value(tmp_path: Path, line: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Settings.load(toml_path=write_toml(tmp_path, line + "\n"), environ={})


@pytest.mark.parametrize(
    ("line", "field"),
    [("port = 80.7", "port"), ("ping_timeout_s = true", "ping_timeout_s")],
    ids=["float-for-int", "bool-for-float"],
)
def test_toml_value_of_the_wrong_type(tmp_path: Path, line: str, field: str) -> None:
    """A TOML number is already typed: 80.7 is no port (the environment refuses "80.7")."""
    with pytest.raises(ConfigError, match=field):
        Settings.load(toml_path=write_toml(tmp_path, line + "\n"), environ={})


@pytest.mark.parametrize(
    "overrides",
    [{"port": -5}, {"max_window_bits": 8}, {"compression": "maybe"}, {"port": "x"}],
    ids=["port", "window", "bool", "int"],
)
def test_bad_override(overrides: dict[str, Any]) -> None:
    (field,) = overrides
    with pytest.raises(ConfigError, match=field):
        Settings.load(environ={}, overrides=overrides)


@pytest.mark.parametrize("where", ["toml", "overrides"])
def test_unknown_key(tmp_path: Path, where: str) -> None:
    if where == "toml":
        kwargs: dict[str, Any] = {"toml_path": write_toml(tmp_path, "prot = 1\n")}
    else:
        kwargs = {"overrides": {"prot": 1}}
    with pytest.raises(ConfigError, match="prot"):
        Settings.load(environ={}, **kwargs)


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        ("REDWIRE_PROT", "REDWIRE_PORT"),
        ("REDWIRE_MAX_MESAGE_BYTES", "REDWIRE_MAX_MESSAGE_BYTES"),
        ("REDWIRE_ALLOWED_ORIGIN", "REDWIRE_ALLOWED_ORIGINS"),
        ("REDWIRE_API_KEYFILE", "REDWIRE_API_KEY_FILE"),
        ("REDWIRE_REDIS", "REDWIRE_REDIS_URL"),
        ("REDWIRE_ZZZZZZZZZZ", None),
    ],
)
def test_unknown_environment_variable_names_the_closest_setting(
    variable: str, hint: str | None
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ={variable: "1", "REDWIRE_PORT": "1"})
    message = str(info.value)
    assert variable in message
    assert (f"did you mean {hint}?" in message) if hint else ("did you mean" not in message)


def test_project_variables_that_are_not_settings_pass() -> None:
    assert {"REDWIRE_CONFIG", "REDWIRE_INSTANCE", "REDWIRE_CHROMIUM"} <= ENV_NOT_SETTINGS
    env = {name: "x" for name in ENV_NOT_SETTINGS - {"REDWIRE_CONFIG"}}  # CONFIG: a TOML path
    assert Settings.load(environ={**env, "redwire_prot": "1", "OTHER_PROT": "1"}) == Settings()


def test_unknown_toml_key_names_the_closest_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_mesage_bytes \(did you mean max_message_bytes\?\)"):
        Settings.load(toml_path=write_toml(tmp_path, "max_mesage_bytes = 1"), environ={})


# --- secrets ---------------------------------------------------------------------------------


def test_api_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  s3cret-key\n\n")
    s = Settings.load(environ={"REDWIRE_API_KEY_FILE": str(key_file)})
    assert (s.api_key, s.api_key_file) == ("s3cret-key", str(key_file))
    assert Settings(api_key_file=str(key_file)).api_key == "s3cret-key"
    assert Settings.load(environ={}, overrides={"api_key_file": str(key_file)}) == s
    toml = write_toml(tmp_path, f'api_key_file = "{key_file}"')
    assert Settings.load(toml_path=toml, environ={}) == s


def test_api_key_file_stays_out_of_the_child_environment(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key")
    s = Settings(api_key_file=str(key_file), port=1)
    env = s.to_env()
    assert "s3cret-key" not in "".join(env.values())
    assert env["REDWIRE_API_KEY"] == "none"
    assert Settings.load(environ=env) == s
    assert s.replace(port=2).api_key == "s3cret-key"


@pytest.mark.parametrize("content", [None, "", " \n\t", b"\xff\xfe"])
def test_unreadable_or_empty_api_key_file_is_an_error(
    tmp_path: Path, content: str | bytes | None
) -> None:
    key_file = tmp_path / "key"
    if isinstance(content, bytes):
        key_file.write_bytes(content)
    elif content is not None:
        key_file.write_text(content)
    with pytest.raises(ConfigError, match=f"api_key_file.*{key_file}"):
        Settings.load(environ={"REDWIRE_API_KEY_FILE": str(key_file)})


@pytest.mark.parametrize(
    ("environ", "overrides"),
    [
        ({"REDWIRE_API_KEY": "k", "REDWIRE_API_KEY_FILE": "KEYFILE"}, {}),
        ({"REDWIRE_API_KEY": "k"}, {"api_key_file": "KEYFILE"}),
        ({"REDWIRE_API_KEY_FILE": "KEYFILE"}, {"api_key": "k"}),
    ],
)
def test_api_key_and_api_key_file_together_is_an_error(
    tmp_path: Path, environ: dict[str, str], overrides: dict[str, str]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file")
    fix = {k: str(key_file) if v == "KEYFILE" else v for k, v in {**environ, **overrides}.items()}
    environ = {k: v for k, v in fix.items() if k.startswith(ENV_PREFIX)}
    overrides = {k: v for k, v in fix.items() if not k.startswith(ENV_PREFIX)}
    with pytest.raises(ConfigError, match="api_key and api_key_file"):
        Settings.load(environ=environ, overrides=overrides)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:secret@h:6379/0", "redis://user:***@h:6379/0"),
        ("rediss://default:se:cr@t@h/0", "rediss://default:***@h/0"),
        ("redis://secret@h", "redis://***@h"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///run/redis.sock?db=1&password=secret", "unix:///run/redis.sock?db=1&password=***"),
        ("unix://:secret@/run/redis.sock", "unix://:***@/run/redis.sock"),
        ("redis://:s@[::1]:6379", "redis://:***@[::1]:6379"),
        ("memory://", "memory://"),
        ("redis://:secret@[::1", "redis://***"),  # unparseable: nothing of it shown
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "secret" not in mask_url(url)


def test_repr_hides_secrets() -> None:
    text = repr(Settings(api_key="k3y-value", redis_url="redis://:pa55@h:6379/0"))
    assert "k3y-value" not in text and "pa55" not in text
    assert "api_key='***'" in text and "redis_url='redis://:***@h:6379/0'" in text


# --- to_env round trip ----------------------------------------------------------------------


ROUND_TRIP = [
    Settings(),
    Settings(
        host="0.0.0.0",
        port=0,
        workers=3,
        redis_url="unix:///tmp/redis.sock",
        redis_server_path="/usr/bin/redis-server",
        app="myapp.hooks:App",
        api_key="k3y",
        allowed_origins=("https://a.example", "http://b.example:8080"),
        log_level="DEBUG",
        handshake_timeout_s=0.2,
        ping_interval_s=None,
        ping_timeout_s=0.1,
        close_timeout_s=1 / 3,
        compression=False,
        compression_level=-1,
        max_window_bits=9,
        write_buffer_high_bytes=10,
        write_buffer_low_bytes=10,
        max_send_buffer_bytes=20,
        coalesce_window_s=0.0,
        channel_prefix="app:",
        metrics_dir="/tmp/metrics",
        topics=(
            TopicRule("chat.*", history_size=100, history_ttl_s=60.0),
            TopicRule("room:?", presence=True, join_leave=True),
        ),
    ),
    Settings(allowed_origins=("https://only.example",)),
]


@pytest.mark.parametrize("original", ROUND_TRIP, ids=["defaults", "everything", "one-origin"])
def test_to_env_round_trip(original: Settings) -> None:
    env = original.to_env()
    assert all(key.startswith(ENV_PREFIX) for key in env)
    assert all(isinstance(value, str) for value in env.values())
    assert Settings.load(environ=env) == original


@pytest.mark.parametrize("origins", [(), ("*",), ("null", "https://a.example")])
def test_to_env_round_trip_origin_lists(origins: tuple[str, ...]) -> None:
    """allowed_origins=() (the same origin only) must not turn into ("*",) or back."""
    original = Settings(allowed_origins=origins)
    assert Settings.load(environ=original.to_env()).allowed_origins == origins


def test_default_origin_policy_is_same_origin_only() -> None:
    assert Settings().allowed_origins == ()
    assert Settings.load(environ={"REDWIRE_ALLOWED_ORIGINS": ""}).allowed_origins == ()


@pytest.mark.parametrize(
    "entry",
    ["https://a.example/", "https://a.example/path", "a.example", "none", "", "https://", "*.a"],
)
def test_bad_origin_entries_are_refused(entry: str) -> None:
    with pytest.raises(ConfigError, match="allowed_origins"):
        Settings(allowed_origins=(entry,))


# --- derived limits --------------------------------------------------------------------------


def test_max_data_bytes() -> None:
    s = Settings(max_message_bytes=100_000, max_topic_bytes=100)
    assert s.max_data_bytes == 100_000 - 100 - 256
    assert Settings().max_data_bytes == Settings().max_message_bytes - 200 - 256


def test_max_message_bytes_leaves_room_for_data() -> None:
    """A message frame is data + topic + <= 256 bytes of fields: a limit that leaves no room
    for data makes every publish `too_large`, so it is a configuration error."""
    with pytest.raises(ConfigError, match="max_message_bytes"):
        Settings(max_message_bytes=400, max_topic_bytes=200)
