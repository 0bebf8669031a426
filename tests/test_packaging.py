"""The generic import names `broker`, `worker` and `client` must resolve to this checkout."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["broker", "worker", "client"])
def test_imported_package_is_this_repos(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / name


def test_distribution_lists_packages_explicitly() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["project"]["name"] == "redwire"
    packages = config["tool"]["setuptools"]["packages"]
    assert "tests" not in packages and "deploy" not in packages
    assert {"broker", "worker", "client"} <= set(packages)


def test_broker_never_imports_worker_or_client() -> None:
    for path in (REPO / "broker").rglob("*.py"):
        text = path.read_text()
        for banned in ("import worker", "from worker", "import client", "from client"):
            assert banned not in text, f"{path} has {banned!r}"


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        # The bus' Redis modules: one node, a Cluster, behind Sentinel, and their wire.
        (
            "redis",
            {
                "broker/bus/redis.py",
                "broker/bus/redis_cluster.py",
                "broker/bus/redis_sentinel.py",
                "broker/bus/redis_wire.py",
            },
        ),
        ("hiredis", {"broker/bus/redis_wire.py"}),
        ("msgpack", {"broker/envelope.py"}),
        ("uvloop", {"worker/main.py"}),
    ],
)
def test_third_party_imports_stay_in_their_module(library: str, allowed: set[str]) -> None:
    users = set()
    for top in ("broker", "worker", "client"):
        for path in (REPO / top).rglob("*.py"):
            for line in path.read_text().splitlines():
                stripped = line.strip()
                if stripped.startswith(
                    (f"import {library}", f"from {library} ", f"from {library}.")
                ):
                    users.add(str(path.relative_to(REPO)))
    assert users <= allowed
