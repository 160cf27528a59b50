"""The outbox on an external broker that reports no PUBACK of devices (mosquitto), on both stores.

Without EMQX's ``message_acked`` event an execution stays SENT until its device answers. The replica
outbox (PostgreSQL) claims unacknowledged requests after their lease, and a restarted service (SQLite)
restores its outbox; what the broker acknowledged (its QoS 1 PUBACK) is recorded as handed over and
published by neither, so a device with a persistent session finds exactly one copy when it comes back.
What the broker did not acknowledge still goes out (here: after the lease; tests/test_replicas.py: a
crashed replica's request; tests/test_external_broker.py: a broker that was away).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from server.app import FleetcmdApp
from server.core.lifecycle import Status
from server.store.postgres import HANDED_UNTIL
from tests import pgserver
from tests.devices import wait_for
from tests.mosquitto import Mosquitto, mosquitto
from tests.test_external_broker import WAIT, EmqxFirmware, external_settings, final, send

pytestmark = pytest.mark.timeout(60)

LEASE_SECONDS = 1
LEASES_WATCHED = 4


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with mosquitto(tmp_path / "mosquitto") as running:
        yield running


@pytest.fixture
async def replica(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[FleetcmdApp]:
    """One replica on PostgreSQL and mosquitto, with a one-second outbox lease."""
    settings = external_settings(
        tmp_path,
        broker,
        database_url=pgserver.fresh_database_url(),
        outbox_lease_seconds=LEASE_SECONDS,
        allow_anonymous=False,
    )
    async with FleetcmdApp(settings) as running:
        assert running.external is not None and running.external.connected
        assert running.replica is not None and running.replica.takeover
        yield running


async def lease_row(app: FleetcmdApp, execution_id: str) -> tuple[int | None, str | None, bool]:
    store = app.store
    assert store is not None
    row = await store._readers().fetchrow(  # type: ignore[attr-defined]
        "SELECT lease_until, lease_owner, handed FROM executions WHERE execution_id = $1", execution_id
    )
    return row["lease_until"], row["lease_owner"], row["handed"]


async def test_an_offline_device_with_a_session_gets_one_copy_however_many_leases_pass(
    replica: FleetcmdApp, broker: Mosquitto
) -> None:
    assert replica.registry is not None and replica.replica is not None
    await replica.registry.create_thing("sleepy", "", {})
    # The device subscribed once with a persistent session, then went away: mosquitto queues for it.
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "sleepy", clean_start=False).begin)
    await asyncio.to_thread(device.stop)

    execution = await send(replica, "sleepy", ttl=30)
    await wait_for(lambda: replica.handover is not None and replica.handover.recorded == 1, WAIT, "the PUBACK recorded")
    assert await lease_row(replica, execution.execution_id) == (HANDED_UNTIL, None, True)
    # Several leases pass (nothing to await: what is watched is that nothing happens meanwhile).
    watched_until = time.monotonic() + LEASES_WATCHED * LEASE_SECONDS + 0.5
    await wait_for(lambda: time.monotonic() > watched_until, WAIT, "the leases to pass")
    assert replica.replica.claimed == 0
    assert (await replica.core.get(execution.execution_id)).status is Status.SENT  # type: ignore[union-attr]

    back = EmqxFirmware(broker.port, "sleepy", clean_start=False)
    await asyncio.to_thread(back.start)  # no SUBSCRIBE: the session kept it
    try:
        got = await back.next()
        assert got.user["fleetcmd-execution"] == execution.execution_id
        done = await final(replica, execution)
        assert done.status is Status.SUCCEEDED
        await back.nothing()  # exactly one copy
    finally:
        await asyncio.to_thread(back.stop)


async def test_a_request_not_acknowledged_by_the_broker_is_published_again_after_its_lease(
    replica: FleetcmdApp, broker: Mosquitto
) -> None:
    assert replica.registry is not None and replica.replica is not None
    await replica.registry.create_thing("late", "", {})
    # Nobody subscribed: mosquitto answers "no matching subscribers", which hands nothing over.
    execution = await send(replica, "late", ttl=30)
    await wait_for(lambda: replica.replica is not None and replica.replica.claimed >= 1, WAIT, "a claim after the lease")
    assert replica.handover is not None and replica.handover.recorded == 0
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "late").begin)
    try:
        # The next lease's publish reaches the device, which ends the execution.
        done = await final(replica, execution)
        assert done.status is Status.SUCCEEDED
    finally:
        await asyncio.to_thread(device.stop)


async def test_a_restart_does_not_publish_again_what_the_broker_took(tmp_path: Path, broker: Mosquitto) -> None:
    # SQLite: one process; its outbox is restored after a restart from the non-final executions.
    device = await asyncio.to_thread(EmqxFirmware(broker.port, "sleepy", clean_start=False).begin)
    await asyncio.to_thread(device.stop)
    settings = external_settings(tmp_path, broker)
    async with FleetcmdApp(settings) as first:
        taken = await send(first, "sleepy", ttl=60)
        await wait_for(lambda: first.handover is not None and first.handover.recorded == 1, WAIT, "the PUBACK recorded")
    async with FleetcmdApp(settings) as second:
        assert second.external is not None and second.external.connected
        assert (await second.core.get(taken.execution_id)).status is Status.SENT  # type: ignore[union-attr]
        back = EmqxFirmware(broker.port, "sleepy", clean_start=False)
        await asyncio.to_thread(back.start)
        try:
            got = await back.next()
            assert got.user["fleetcmd-execution"] == taken.execution_id
            assert (await final(second, taken)).status is Status.SUCCEEDED
            await back.nothing()  # exactly one copy
        finally:
            await asyncio.to_thread(back.stop)
