"""README.md's code blocks run as shown, against a live `redwire serve`.

Every ```python block runs as a script in its own interpreter, every ```js block as an ES
module in Node, with a bounded timeout; a block that raises (non-zero exit) fails the test.
Only what the README itself tells the reader to substitute is substituted:

- Python: `REDIS_URL` is taken from the broker's startup line `serving http://HOST:PORT/
  with redis URL`, and `ws://127.0.0.1:8765/` becomes the live broker's `ws://HOST:PORT/`
  (the README says both);
- JS: the block is browser code on the broker's page. Node plays the page: `location` is the
  page's URL, `WebSocket` is Node's `ws` package (no global WebSocket before Node 22), and the
  specifier `/redwire.js` is resolved as a browser resolves it, against the page, to the file
  the broker serves there (downloaded, since Node does not import over HTTP).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import REPO, ServerProcess, serve

README = REPO / "README.md"
NODE_DIR = REPO / "tests" / "interop" / "node"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```\s*$", re.S | re.M)
README_WS_URL = "ws://127.0.0.1:8765/"
SNIPPET_TIMEOUT_S = 60.0


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def test_readme_has_the_snippets_this_file_runs() -> None:
    assert blocks("python"), "README.md has no ```python block"
    assert blocks("js"), "README.md has no ```js block"
    for body in blocks("python"):
        assert README_WS_URL in body or "REDIS_URL" in body


@pytest.fixture(scope="module", params=["--redis", "embedded"])
def broker(request: pytest.FixtureRequest, redis_server: Any) -> Iterator[ServerProcess]:
    """`redwire serve --redis URL` (the session's Redis), and plain `redwire serve` with its
    embedded Redis: the README's two ways, each read from the startup line."""
    proc = serve(redis_server.url if request.param == "--redis" else None, workers=2)
    try:
        yield proc
    finally:
        proc.stop()


def announced_redis(proc: ServerProcess) -> str:
    """The Redis URL of the startup line the README points the reader at."""
    line = proc.wait_for_output(r"^serving http://\S+/ with redis ")
    match = re.search(r"with redis (?:embedded )?(\S+)\s*$", line)
    assert match, line
    return match.group(1)


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=SNIPPET_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{argv} did not finish in {SNIPPET_TIMEOUT_S}s:\n{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippet_runs(broker: ServerProcess, tmp_path: Path, index: int) -> None:
    source = blocks("python")[index].replace(README_WS_URL, f"{broker.url}/")
    script = tmp_path / f"readme_{index}.py"
    script.write_text(source)
    env = {**os.environ, "REDIS_URL": announced_redis(broker)}
    out = run([sys.executable, str(script)], cwd=tmp_path, env=env)
    if "chat.lobby" in source:  # the messages printed were delivered, not just sent
        assert "'text': 'hi'" in out and "from the back end" in out, out


# The page the browser snippet runs in: its location, the WebSocket class, and a promise of
# the first console.log (the snippet's subscriber), imported before the snippet's own imports.
PAGE = """
import { createRequire } from "node:module";
const require = createRequire(%(node_dir)s);
globalThis.WebSocket = require("ws");
globalThis.location = { href: %(page)s };
const print = console.log;
globalThis.firstLog = new Promise((resolve) => {
  console.log = (...args) => { print(...args); resolve(args); };
});
"""

AFTER = """
const logged = await Promise.race([
  globalThis.firstLog,
  new Promise((_, reject) => setTimeout(() => reject(new Error("nothing logged")), %(ms)d)),
]);
process.stdout.write("LOGGED " + JSON.stringify(logged) + "\\n");
process.exit(0);
"""


@pytest.mark.parametrize("index", range(len(blocks("js"))))
def test_js_snippet_runs_in_node(broker: ServerProcess, tmp_path: Path, index: int) -> None:
    node = shutil.which("node")
    assert node, "node is needed (apt-get install -y nodejs)"
    assert (NODE_DIR / "node_modules" / "ws").is_dir(), "run npm install in tests/interop/node"
    page = f"http://{broker.host}:{broker.port}/"
    with urllib.request.urlopen(page + "redwire.js", timeout=10) as response:
        (tmp_path / "redwire.js").write_bytes(response.read())
    (tmp_path / "page.mjs").write_text(
        PAGE % {"node_dir": json.dumps(str(NODE_DIR / "package.json")), "page": json.dumps(page)}
    )
    body = blocks("js")[index].replace('"/redwire.js"', '"./redwire.js"')
    waits = "console.log" in body
    source = 'import "./page.mjs";\n' + body + (AFTER % {"ms": 10_000} if waits else "")
    (tmp_path / "snippet.mjs").write_text(source)
    out = run([node, str(tmp_path / "snippet.mjs")], cwd=tmp_path)
    if waits and "chat.lobby" in body:
        logged = json.loads(out.rsplit("LOGGED ", 1)[1])
        assert {"text": "hi"} in logged, out
