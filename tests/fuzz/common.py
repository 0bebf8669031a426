"""What every fuzz target shares: the `Finding` error, input readers, frame building."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from broker.frames import frame_header_size, serialize_frame
from broker.masking import apply_mask

MASK_KEY = b"\x37\xfa\x21\x3d"


class Finding(AssertionError):
    """A property the harness checks does not hold (a bug, like any unexpected exception)."""


def check(condition: object, message: str) -> None:
    if not condition:
        raise Finding(message)


class Reader:
    """Take bytes off the front of an input; past its end every read is empty/zero."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv1: bool = False, mask: bool = False
) -> bytes:
    """`serialize_frame`, but masked with a fixed key: the same input, the same bytes."""
    raw = serialize_frame(opcode, payload, fin=fin, rsv1=rsv1)
    if not mask:
        return raw
    head = frame_header_size(len(payload))
    body = apply_mask(payload, MASK_KEY) if payload else b""
    return bytes((raw[0], raw[1] | 0x80)) + raw[2:head] + MASK_KEY + body


def chunks(data: bytes, pattern: int) -> Iterator[bytes]:
    """`data` split by `pattern` (0..15): 0 one byte at a time, else cycling sizes."""
    sizes = (1,) if pattern == 0 else (pattern, 1, 2 * pattern + 1, 3, 7 * pattern, 2)
    pos = i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        yield data[pos : pos + size]
        pos += size
        i += 1


STATIC_CONTENT = {"site/index.html": b"<p>index</p>", "site/sub/a.txt": b"a", "secret.txt": b"!"}


def _static_dir() -> Path:
    """A `static_dir` with two files, and a secret plus a symlink to it just outside. One
    fixed place per user, made again as needed (libFuzzer's exit skips clean-up)."""
    root = Path(tempfile.gettempdir()) / f"redwire-fuzz-static-{os.getuid()}"
    (root / "site" / "sub").mkdir(parents=True, exist_ok=True)
    for path, data in STATIC_CONTENT.items():
        # Replaced whole, never truncated: another fuzzer may be reading it right now.
        scratch = root / f"{path}.{os.getpid()}"
        scratch.write_bytes(data)
        os.replace(scratch, root / path)
    with contextlib.suppress(FileExistsError):
        (root / "site" / "link.txt").symlink_to(root / "secret.txt")
    return root / "site"


STATIC_DIR = _static_dir()
STATIC_FILES = frozenset(v for k, v in STATIC_CONTENT.items() if k.startswith("site/"))
