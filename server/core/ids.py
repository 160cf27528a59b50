"""The identifiers fleetcmd gives a new execution.

An execution id is a UUIDv7 (RFC 9562) written as 32 lowercase hex digits: its first 48 bits
are the creation time in milliseconds, the other 74 (besides version and variant) random. Ids
created close in time sort close together, so the indexes keyed by execution id (the
``executions`` row lookup, ``events`` by execution) take each new id near the end instead of
on a random page: a batch of commands rewrites a few pages of those indexes instead of one
per command, which halved the bytes the store writes per command (BENCHMARKS.md). The 74
random bits still make an id impossible to guess. A command id is 128 random bits.
"""

from __future__ import annotations

import os
import threading

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0x2 << 62
# The random bits a UUIDv7 keeps: all of the low 80 but the version nibble and the variant pair.
_RANDOM_MASK = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)


def time_ordered_id(at_ms: int, random: bytes) -> str:
    """A UUIDv7 as 32 lowercase hex digits.

    Args:
        at_ms: The creation time, Unix milliseconds (the low 48 bits are used).
        random: At least 10 random bytes (the first 10 are used).
    """
    bits = int.from_bytes(random[:10], "big") & _RANDOM_MASK
    return f"{(at_ms & 0xFFFF_FFFF_FFFF) << 80 | _VERSION_7 | _VARIANT_RFC | bits:032x}"


# Random bytes per new execution: 10 for the execution id, 16 for the command id.
_PER_EXECUTION = 26
# Executions served by one os.urandom call. os.urandom releases the GIL around its system call,
# and taking the GIL back on the event loop's thread waits for the store's writer thread: one
# call per command cost more than the rest of making its ids.
_POOL_EXECUTIONS = 256


class _RandomPool:
    """Bytes from ``os.urandom`` handed out once each, in slices; refilled when used up.

    Thread-safe, and emptied in a forked child (which must not hand out its parent's bytes again).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = b""
        self._pos = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._bytes):
                self._bytes, self._pos = os.urandom(n * _POOL_EXECUTIONS), 0
            start = self._pos
            self._pos = start + n
            return self._bytes[start : start + n]

    def reset(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at the fork stays held in the child
        self._bytes, self._pos = b"", 0


_pool = _RandomPool()
os.register_at_fork(after_in_child=_pool.reset)


def new_execution_ids(at_ms: int) -> tuple[str, str]:
    """A new ``(execution_id, command_id)``: a time-ordered id and a random one (32 hex digits each)."""
    random = _pool.take(_PER_EXECUTION)
    return time_ordered_id(at_ms, random), random[10:].hex()
