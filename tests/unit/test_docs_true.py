"""docs/operations.md and docs/protocol.md say what the code does.

- every `redwire serve` flag (from `broker.cli.build_parser()`) is in operations.md's flags
  list, and the list names no flag `serve` does not have;
- every metric of worker/metrics.py's tables is a row of operations.md's metrics table, and
  the table has no row the module does not export;
- every setting operations.md names (a backticked snake_case word, a `REDWIRE_*` variable)
  is a field of `Settings`, apart from the few words below that name something else;
- `POST /publish` refusals are the JSON body protocol.md promises, for every status it lists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from broker.cli import build_parser
from broker.errors import HandshakeError
from broker.settings import Settings
from tests.support.processes import REPO
from worker import http_routes, metrics, wire

OPERATIONS = (REPO / "docs" / "operations.md").read_text()
PROTOCOL = (REPO / "docs" / "protocol.md").read_text()

# Backticked snake_case words in operations.md that are not settings, and why.
NOT_SETTINGS = {
    "on_connect": "an application hook (worker/hooks.py)",
    "stop_grace_period": "a docker compose key",
}
NOT_SETTINGS_ENV = {"REDWIRE_CONFIG": "the TOML file to read settings from"}


def section(text: str, title: str) -> str:
    """The body of the `## title` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section {title!r}"
    return match.group(1)


def serve_flags() -> set[str]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            serve = action.choices["serve"]
            return {
                option
                for a in serve._actions
                for option in a.option_strings
                if option.startswith("--") and option != "--help"
            }
    raise AssertionError("no `serve` subcommand")


def documented_flags() -> set[str]:
    settings = section(OPERATIONS, "Settings")
    match = re.search(r"^3\. flags:(.*?)`redwire serve --help`", settings, re.S | re.M)
    assert match, "operations.md: no '3. flags:' list in Settings"
    return set(re.findall(r"`(--[a-z][a-z0-9-]*)`", match.group(1)))


def test_every_serve_flag_is_listed() -> None:
    assert serve_flags() - documented_flags() == set(), "flags missing from operations.md"


def test_the_flags_list_names_only_real_flags() -> None:
    assert documented_flags() - serve_flags() == set(), "operations.md lists unknown flags"


def exported_metrics() -> set[str]:
    """Every series name worker/metrics.py's tables make (counters with `_total`)."""
    strip = metrics._strip_total
    names = {f"redwire_{strip(n)}_total" for n in metrics._COUNTERS}
    names |= {f"redwire_bus_{n}_total" for n in metrics._BUS_COUNTERS}
    names |= {f"redwire_{n}_total" for n in getattr(metrics, "_REASON_COUNTERS", {})}
    names |= {f"redwire_{n}" for n in metrics._GAUGES}
    return names | {"redwire_bus_healthy"}


def documented_metrics() -> dict[str, str]:
    """Metric name -> its type, from the rows of operations.md's metrics table."""
    rows = re.findall(r"^\| `(redwire_\w+)` \| (\w+) \|", section(OPERATIONS, "Metrics"), re.M)
    return dict(rows)


def test_the_tables_give_what_the_module_exports() -> None:
    assert set(metrics.series_names()) == exported_metrics()


def test_every_metric_is_in_the_table() -> None:
    assert exported_metrics() - set(documented_metrics()) == set(), "metrics missing from docs"


def test_the_table_names_only_exported_metrics() -> None:
    assert set(documented_metrics()) - exported_metrics() == set(), "docs list unknown metrics"


def test_metric_types_match() -> None:
    for name, kind in documented_metrics().items():
        assert kind == ("counter" if name.endswith("_total") else "gauge"), name


def test_the_metrics_exist_at_zero_before_any_traffic() -> None:
    """The doc promises a series from the first scrape: render one idle worker's metrics."""
    from worker.stats import WorkerStats

    rendered = metrics.Metrics("0", WorkerStats(), lambda: {}).render()[0].decode()
    present = set(re.findall(r"^(redwire_\w+?)(?:\{|\s)", rendered, re.M))
    assert exported_metrics() - present == set()


SETTING_FIELDS = {f.name for f in dataclasses.fields(Settings)}


def error_codes() -> set[str]:
    """Error codes: protocol.md's table and worker/wire.py's constants."""
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", section(PROTOCOL, "Errors"), re.M))
    constants = (v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str))
    return codes | {v for v in constants if re.fullmatch(r"[a-z]+(_[a-z]+)*", v)}


def metric_label_values() -> set[str]:
    reason_counters = getattr(metrics, "_REASON_COUNTERS", {})
    return {reason for _, reasons in reason_counters.values() for reason in reasons}


def test_every_setting_named_exists() -> None:
    words = set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", OPERATIONS))
    words = {w for w in words if not w.startswith("redwire_")}  # metrics: checked above
    unknown = words - SETTING_FIELDS - set(NOT_SETTINGS) - error_codes()
    unknown -= metric_label_values()
    assert unknown == set(), "operations.md names settings Settings does not have"
    for word in NOT_SETTINGS:
        assert word in words, f"{word} is no longer in operations.md: drop it from NOT_SETTINGS"


def test_every_environment_variable_named_is_a_setting() -> None:
    for name in set(re.findall(r"\bREDWIRE_[A-Z0-9_]+", OPERATIONS)) - set(NOT_SETTINGS_ENV):
        assert name.removeprefix("REDWIRE_").lower() in SETTING_FIELDS, name


def test_the_settings_table_names_only_fields() -> None:
    rows = re.findall(r"^\| (`[^|]+`) \|", section(OPERATIONS, "Settings"), re.M)
    assert rows
    for cell in rows:
        for name in re.findall(r"`([^`]+)`", cell):
            assert name in SETTING_FIELDS, name


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, body


def publish_statuses() -> set[int]:
    """The statuses protocol.md lists for `POST /publish` refusals."""
    http = section(PROTOCOL, "HTTP on the same port")
    return {int(s) for s in re.findall(r"\b(4\d\d|5\d\d)\b", http)}


@pytest.mark.parametrize("status", sorted(publish_statuses() | {405}))
def test_publish_refusals_are_the_json_protocol_md_says(status: int) -> None:
    assert {400, 401, 404, 413, 503} <= publish_statuses()
    got, fields, body = split_response(http_routes.publish_error(status, "why"))
    assert got == status
    assert fields["content-type"] == "application/json"
    reply = json.loads(body)
    assert set(reply) == {"error", "reason"} and reply["reason"] == "why"
    assert isinstance(reply["error"], str) and reply["error"]


def test_a_parser_refusal_of_publish_is_json_and_of_other_paths_text() -> None:
    too_big = HandshakeError(413, "body larger than 1048576 bytes")
    status, fields, body = split_response(http_routes.refusal("/publish?x=1", too_big))
    assert (status, fields["content-type"]) == (413, "application/json")
    assert json.loads(body) == {"error": "too_large", "reason": too_big.reason}
    status, fields, _ = split_response(http_routes.refusal("/other", too_big))
    assert status == 413 and fields["content-type"].startswith("text/plain")
    assert split_response(http_routes.refusal(None, too_big))[0] == 413
