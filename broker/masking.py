"""WebSocket masking (RFC 6455 section 5.3): XOR a payload with a repeating 4-byte key.

`apply_mask` is the C version from `broker._speedups` when it was built, else
`apply_mask_plain`, which uses one big-integer XOR (no per-byte Python loop). Both are
tested against each other.
"""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview


def apply_mask_plain(data: Buffer, mask: bytes) -> bytes:
    """Return `data` XOR the repeated 4-byte `mask`."""
    if len(mask) != 4:
        raise ValueError("mask must be 4 bytes")
    n = len(memoryview(data))
    if n == 0:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    value = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(n, "little")


try:
    from broker._speedups import apply_mask as apply_mask_c
except ImportError:  # not compiled (no C compiler at install time): the plain version
    apply_mask_c = None

apply_mask = apply_mask_c or apply_mask_plain
