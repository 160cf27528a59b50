"""Execution ids: UUIDv7, ordered by creation time, random within a millisecond."""

from __future__ import annotations

import uuid

from server.core.ids import new_execution_ids, time_ordered_id


def test_an_execution_id_is_a_uuid7_with_its_time_and_a_command_id_is_random_hex() -> None:
    execution_id, command_id = new_execution_ids(1_763_800_000_123)
    parsed = uuid.UUID(execution_id)
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert parsed.int >> 80 == 1_763_800_000_123
    for value in (execution_id, command_id):
        assert len(value) == 32 and value == value.lower() and int(value, 16) >= 0
    assert uuid.UUID(command_id).int != parsed.int


def test_ids_sort_by_creation_time_and_differ_within_a_millisecond() -> None:
    ids = [new_execution_ids(ms)[0] for ms in (1_000, 1_001, 1_002, 2**40)]
    assert ids == sorted(ids)
    same_ms = {new_execution_ids(1_001)[0] for _ in range(1_000)}
    assert len(same_ms) == 1_000
    assert all(i[:12] == f"{1_001:012x}" for i in same_ms)


def test_version_and_variant_bits_are_set_whatever_the_random_bytes() -> None:
    # All ones and all zeros: only the version nibble and the variant pair are forced.
    assert time_ordered_id(0, b"\xff" * 10) == "0000000000007fffbfffffffffffffff"
    assert time_ordered_id(2**48 - 1, bytes(10)) == "ffffffffffff70008000000000000000"
    assert time_ordered_id(2**48 + 5, bytes(10))[:12] == "000000000005"  # only the low 48 bits of the time
