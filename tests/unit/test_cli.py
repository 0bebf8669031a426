"""broker.cli and broker.cli_tools: argument parsing, --version, help, check-config sources."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker import cli, cli_tools
from broker.cli_tools import effective_settings, mask_url, settings_reference
from broker.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_redwire_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() reads os.environ: start every test from an environment without REDWIRE_*."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def parse(*argv: str) -> dict[str, object]:
    return cli.settings_overrides(cli.build_parser().parse_args(list(argv)))


# --- parsing ---------------------------------------------------------------------------------


def test_serve_flags_become_settings_fields() -> None:
    overrides = parse(
        "serve", "--host", "0.0.0.0", "--port", "9000", "--workers", "3", "--redis", "memory://"
    )
    assert overrides == {"host": "0.0.0.0", "port": 9000, "workers": 3, "redis_url": "memory://"}
    assert parse("serve") == {}


def test_repeatable_flags_become_tuples() -> None:
    overrides = parse(
        "serve", "--allowed-origin", "https://a.example", "--allowed-origin", "http://b:8080"
    )
    assert overrides == {"allowed_origins": ("https://a.example", "http://b:8080")}
    settings = Settings.load(environ={}, overrides=overrides)
    assert settings.allowed_origins == ("https://a.example", "http://b:8080")
    overrides = parse("serve", "--allowed-host", "app.example", "--allowed-host", ".example.org")
    assert overrides == {"allowed_hosts": ("app.example", ".example.org")}
    settings = Settings.load(environ={}, overrides=overrides)
    assert settings.allowed_hosts == ("app.example", ".example.org")


def test_paths_are_made_absolute() -> None:
    assert parse("serve", "--static-dir", "web")["static_dir"] == str(Path("web").absolute())
    overrides = parse("serve", "--api-key-file", "key.txt")
    assert overrides == {"api_key_file": str(Path("key.txt").absolute())}


@pytest.mark.parametrize("given", ["debug", "DEBUG", "Warning", "error", "info"])
def test_log_level_choices_are_case_insensitive(given: str) -> None:
    assert parse("serve", "--log-level", given) == {"log_level": given.upper()}
    Settings.load(environ={}, overrides=parse("serve", "--log-level", given))


def test_log_level_outside_the_choices_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["serve", "--log-level", "verbose"])
    assert exc.value.code == 2
    assert "debug" in capsys.readouterr().err


def test_every_flag_names_a_settings_field() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert set(cli.FLAG_NAMES) <= names


def test_publish_and_subscribe_arguments() -> None:
    args = cli.build_parser().parse_args(["publish", "t", '{"a": 1}', "--key", "k", "--msgpack"])
    assert (args.topic, args.data, args.key, args.msgpack, args.url) == (
        "t",
        '{"a": 1}',
        "k",
        True,
        cli.DEFAULT_URL,
    )
    args = cli.build_parser().parse_args(
        ["subscribe", "a", "b", "--since", "3:ep", "--count", "2", "--url", "ws://h:1/"]
    )
    assert (args.topics, args.since, args.count, args.url) == (["a", "b"], "3:ep", 2, "ws://h:1/")


def test_publish_needs_topic_and_data(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["publish", "only-topic"])
    assert exc.value.code == 2


# --- --version and help ----------------------------------------------------------------------


def test_version_flag_prints_the_distribution_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"redwire {cli_tools.version()}"


def test_version_falls_back_to_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert cli_tools.version() == expected


def test_serve_help_lists_every_setting_and_the_precedence(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "REDWIRE_CONFIG" in out and "[redwire]" in out and "--config" in out
    for f in dataclasses.fields(Settings):
        if f.name != "extra":
            assert f"{ENV_PREFIX}{f.name.upper()}" in out
    assert "{debug,info,warning,error}" in out


def test_reference_shows_defaults() -> None:
    lines = settings_reference().splitlines()
    port = next(line for line in lines if line.split()[:1] == ["port"])
    assert port.split() == ["port", "REDWIRE_PORT", "8765"]
    redis = next(line for line in lines if line.split()[:1] == ["redis_url"])
    assert redis.split()[-1] == "none"


def test_importing_the_cli_does_not_load_the_client() -> None:
    code = (
        "import sys, broker.cli\n"
        "bad = [m for m in sys.modules if m == 'client' or m.startswith('client.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --- check-config ----------------------------------------------------------------------------


def sources(rows: list[cli_tools.Effective]) -> dict[str, str]:
    return {r.name: r.source for r in rows}


def test_each_value_names_its_source(tmp_path: Path) -> None:
    toml = tmp_path / "redwire.toml"
    toml.write_text('[redwire]\nport = 9001\nworkers = 2\nlog_level = "warning"\n')
    settings, rows = effective_settings(
        toml_path=str(toml),
        environ={"REDWIRE_WORKERS": "3", "REDWIRE_MAX_TOPIC_BYTES": "100"},
        overrides={"log_level": "ERROR"},
        flag_names=cli.FLAG_NAMES,
    )
    got = sources(rows)
    assert got["port"] == f"toml {toml}"
    assert got["workers"] == "env REDWIRE_WORKERS"  # env beats TOML
    assert got["max_topic_bytes"] == "env REDWIRE_MAX_TOPIC_BYTES"
    assert got["log_level"] == "flag --log-level"  # a flag beats TOML
    assert got["host"] == "default"
    assert (settings.port, settings.workers, settings.log_level) == (9001, 3, "ERROR")


def test_the_toml_file_may_come_from_redwire_config(tmp_path: Path) -> None:
    toml = tmp_path / "r.toml"
    toml.write_text("port = 9002\n")  # no [redwire] table: the top level
    _, rows = effective_settings(
        toml_path=None, environ={"REDWIRE_CONFIG": str(toml)}, overrides={}
    )
    assert sources(rows)["port"] == f"toml {toml}"
    assert all(r.source == "default" for r in rows if r.name != "port")


def test_check_config_prints_one_line_per_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "redwire.toml"
    toml.write_text('[redwire]\nhost = "127.0.0.2"\n')
    monkeypatch.setenv("REDWIRE_PING_INTERVAL_S", "none")
    assert cli.main(["check-config", "--config", str(toml), "--port", "9003"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {line.split(" = ", 1)[0]: line for line in lines}
    assert set(by_name) == {f.name for f in dataclasses.fields(Settings)}
    assert by_name["host"].startswith('host = "127.0.0.2"')
    assert by_name["host"].endswith(f"# toml {toml}")
    assert by_name["port"].startswith("port = 9003") and by_name["port"].endswith("# flag --port")
    assert by_name["ping_interval_s"].startswith("ping_interval_s = none")
    assert by_name["ping_interval_s"].endswith("# env REDWIRE_PING_INTERVAL_S")
    assert by_name["compression"].split("#")[0].strip() == "compression = true"


def test_check_config_masks_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDWIRE_REDIS_URL", "redis://app:hunter2@10.0.0.5:6379/0")
    assert cli.main(["check-config", "--api-key", "s3cret"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and "s3cret" not in out
    assert 'redis_url = "redis://app:***@10.0.0.5:6379/0"' in out
    assert 'api_key = "***"' in out


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),
        ("rediss://token@h", "rediss://***@h"),
        ("unix:///run/r.sock?db=1&password=pw", "unix:///run/r.sock?db=1&password=***"),
        ("memory://", "memory://"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_an_invalid_configuration_exits_2_with_the_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDWIRE_PORT", "70000")
    assert cli.main(["check-config"]) == 2
    captured = capsys.readouterr()
    assert "port must be 0..65535" in captured.err and captured.out == ""


def test_a_broken_toml_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("[redwire\n")
    assert cli.main(["check-config", "--config", str(toml)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert cli.main(["check-config", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_a_key_from_api_key_file_is_masked_and_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key"
    key.write_text("from-the-file\n")
    assert cli.main(["check-config", "--api-key-file", str(key)]) == 0
    out = capsys.readouterr().out
    assert "from-the-file" not in out
    lines = {line.split(" = ", 1)[0]: line for line in out.splitlines()}
    assert lines["api_key"].startswith('api_key = "***"')
    assert lines["api_key"].endswith("# api_key_file")
    assert lines["api_key_file"].endswith("# flag --api-key-file")
    assert cli.main(["check-config", "--api-key-file", str(tmp_path / "none")]) == 2
    assert "api_key_file" in capsys.readouterr().err


def test_an_unknown_redwire_variable_exits_2_naming_the_closest(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDWIRE_WORKRES", "2")
    assert cli.main(["check-config"]) == 2
    assert "REDWIRE_WORKERS" in capsys.readouterr().err
