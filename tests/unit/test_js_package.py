"""client/js as an npm package: its package.json, its TypeScript declarations, `npm pack`.

TypeScript is pinned in tests/js-types/package.json and installed there by .ci/run; nothing
here reaches the network: the packed tarball has no dependencies, so a scratch project
installs it with `npm install --offline`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "client" / "js"
TYPES = ROOT / "tests" / "js-types"
TSC = TYPES / "node_modules" / "typescript" / "bin" / "tsc"
SHIPPED = {"package.json", "README.md", "redwire.js", "redwire.d.ts"}


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 120) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def node() -> str:
    found = shutil.which("node")
    assert found, "node is missing: bash .ci/run installs it"
    return found


def npm(*args: str | Path, cwd: Path, cache: Path) -> str:
    found = shutil.which("npm")
    assert found, "npm is missing: bash .ci/run installs it"
    return run(found, *args, "--cache", cache, "--no-audit", "--no-fund", cwd=cwd)


def tsc(*args: str | Path, cwd: Path = ROOT) -> str:
    assert TSC.exists(), f"{TSC} is missing: bash .ci/run installs it (npm --prefix {TYPES})"
    return run(node(), TSC, *args, cwd=cwd)


def package_json() -> dict:
    return json.loads((JS / "package.json").read_text())


def test_the_version_is_the_python_packages() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert package_json()["version"] == pyproject["project"]["version"]


def test_package_json_describes_an_es_module_with_types() -> None:
    pkg = package_json()
    assert pkg["name"] == "redwire"
    assert pkg["type"] == "module"
    assert pkg["license"] == "MIT"
    assert pkg["exports"]["."] == {"types": "./redwire.d.ts", "default": "./redwire.js"}
    assert next(iter(pkg["exports"]["."])) == "types"  # "types" must come first to count
    assert pkg["types"] == "./redwire.d.ts"
    assert set(pkg["files"]) | {"package.json"} == SHIPPED
    for field in ("dependencies", "peerDependencies", "optionalDependencies", "scripts"):
        assert field not in pkg, field


def test_the_declarations_name_exactly_what_the_module_exports() -> None:
    """Value exports of redwire.d.ts (read by TypeScript's own API) == redwire.js's."""
    assert TSC.exists(), f"{TSC} is missing: bash .ci/run installs it"
    exports = TYPES / "exports.mjs"
    out = json.loads(run(node(), exports, JS / "redwire.js", JS / "redwire.d.ts"))
    assert out["errors"] == []
    assert out["declared"] == out["runtime"]
    assert "connect" in out["runtime"] and "CLOSE_CODE_POLICY" in out["runtime"]


def test_the_typed_example_compiles_strictly() -> None:
    """client/js/examples/typed.ts and tests/js-types/checks.ts (which also asserts, with
    `@ts-expect-error`, what the declarations refuse) against the source tree."""
    tsc("-p", TYPES, "--noEmit", "--strict")


def test_npm_pack_ships_exactly_the_intended_files(tmp_path: Path) -> None:
    out = npm("pack", "--dry-run", "--json", cwd=JS, cache=tmp_path / "cache")
    [packed] = json.loads(out)
    assert packed["name"] == "redwire"
    assert {f["path"] for f in packed["files"]} == SHIPPED
    assert packed["filename"] == f"redwire-{package_json()['version']}.tgz"


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """A scratch Node project that installed the packed tarball, offline."""
    cache = tmp_path / "cache"
    out = npm("pack", "--json", "--pack-destination", tmp_path, cwd=JS, cache=cache)
    tarball = tmp_path / json.loads(out)[0]["filename"]
    assert tarball.is_file()
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(
        json.dumps({"name": "scratch-app", "private": True, "type": "module"})
    )
    npm("install", tarball, "--offline", cwd=app, cache=cache)
    return app


def test_a_scratch_project_installs_the_tarball_and_imports_it(installed: Path) -> None:
    shipped = {p.name for p in (installed / "node_modules" / "redwire").iterdir()}
    assert shipped == SHIPPED
    (installed / "main.mjs").write_text(
        'import { connect, CLOSE_CODE_POLICY, reconnectPolicy } from "redwire";\n'
        'import pkg from "redwire/package.json" with { type: "json" };\n'
        "class Fake { constructor(url) { this.url = url; } send() {} close() {} }\n"
        'const client = connect("ws://127.0.0.1:1/ws", { WebSocketImpl: Fake });\n'
        "console.log(JSON.stringify({ version: pkg.version, state: client.state,\n"
        "  url: client.url, policy: CLOSE_CODE_POLICY[1001], backoff: reconnectPolicy(1006) }));\n"
        "client.close();\n"
    )
    out = json.loads(run(node(), "main.mjs", cwd=installed))
    assert out == {
        "version": package_json()["version"],
        "state": "connecting",
        "url": "ws://127.0.0.1:1/ws",
        "policy": "now",
        "backoff": "backoff",
    }
    # And with node -e, as a newcomer would try it.
    imports = 'import { connect } from "redwire"; if (typeof connect !== "function") throw 1;'
    run(node(), "--input-type=module", "-e", imports, cwd=installed)


@pytest.mark.parametrize("resolution", ["Bundler", "NodeNext"])
def test_typescript_finds_the_types_through_the_installed_package(
    installed: Path, resolution: str
) -> None:
    """The typed example, unchanged, in the scratch project: "redwire" resolves through
    node_modules/redwire/package.json's `exports` to redwire.d.ts, no `paths` mapping."""
    shutil.copy(JS / "examples" / "typed.ts", installed / "typed.ts")
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "ES2022",
            "module": "NodeNext" if resolution == "NodeNext" else "ESNext",
            "moduleResolution": resolution,
            "lib": ["ES2022", "DOM"],
            "types": [],
            "noImplicitAny": True,
        },
        "files": ["typed.ts"],
    }
    (installed / "tsconfig.json").write_text(json.dumps(config))
    trace = tsc("-p", installed, "--noEmit", "--strict", "--traceResolution", cwd=installed)
    assert "node_modules/redwire/redwire.d.ts" in trace
