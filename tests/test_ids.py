"""Execution ids: UUIDv7, ordered by creation time, random within a millisecond."""

from __future__ import annotations

import os
import uuid

from server.core import ids
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


def test_the_random_bytes_are_handed_out_once_across_refills_and_threads() -> None:
    # Several refills of the pool, taken by eight threads at once: no id twice.
    from concurrent.futures import ThreadPoolExecutor

    n = ids._POOL_EXECUTIONS * 3 + 7
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _i: new_execution_ids(1_001), range(n * 4)))
    assert len({e for e, _c in made}) == len(made) and len({c for _e, c in made}) == len(made)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_execution_ids(1)  # the pool holds bytes the child must not hand out again
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, ",".join(new_execution_ids(1)[1] for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split(","))
    os.waitpid(pid, 0)
    parent = {new_execution_ids(1)[1] for _ in range(3)}
    assert len(child) == 3 and not child & parent
