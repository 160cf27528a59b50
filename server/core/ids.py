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


def new_execution_ids(at_ms: int) -> tuple[str, str]:
    """A new ``(execution_id, command_id)``: a time-ordered id and a random one (32 hex digits each)."""
    random = os.urandom(26)  # one call: 10 bytes for the execution id, 16 for the command id
    return time_ordered_id(at_ms, random), random[10:].hex()
