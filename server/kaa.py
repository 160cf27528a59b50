"""Kaa command execution (CEX, KP1 protocol) on top of the command lifecycle.

Shared by the MQTT dialect (``broker_hooks/kaa.py``) and the HTTP polling
endpoints: a command sent to a Kaa endpoint is an execution with an integer
Kaa id (unique per endpoint and command type); it stays outstanding (QUEUED,
SENT, DELIVERED, IN_PROGRESS) until a result arrives or its TTL ("maximum
command retention for delivery") ends. A result's ``statusCode`` decides the
final status: 2xx SUCCEEDED, 4xx REJECTED, anything else FAILED; ``statusCode``
and ``reasonPhrase`` are kept as the execution's status reason and
``payload`` as its result.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from server.commands import CommandCore, now_ms
from server.errors import FleetcmdError, NotFound, ThingMismatch
from server.lifecycle import Outcome, Status, Trigger
from server.models import DeviceReport, Reason, ThingRecord

log = logging.getLogger(__name__)

MAX_REASON_PHRASE = 1024


class KaaError(FleetcmdError):
    """A Kaa request the server answers with an error; ``status_code`` is HTTP-like."""

    def __init__(self, status_code: int, reason_phrase: str) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        super().__init__(f"{status_code} {reason_phrase}")

    def payload(self) -> dict[str, Any]:
        """The KP1 error body."""
        return {"statusCode": self.status_code, "reasonPhrase": self.reason_phrase}


def status_for(status_code: int) -> Status:
    """The final status a Kaa ``statusCode`` stands for."""
    if 200 <= status_code < 300:
        return Status.SUCCEEDED
    if 400 <= status_code < 500:
        return Status.REJECTED
    return Status.FAILED


def check_command_type(command_type: str) -> None:
    """A command type is a non-empty alphanumeric string.

    Raises:
        KaaError: 400 otherwise.
    """
    if not command_type or not command_type.isalnum():
        raise KaaError(400, f"command type {command_type!r} must be a non-empty alphanumeric string")


@dataclass(frozen=True)
class ItemOutcome:
    """What happened to one item of a result array."""

    id: Any
    error: str | None  # None when it was applied


class KaaCex:
    """Outstanding commands and results of Kaa endpoints."""

    def __init__(self, core: CommandCore) -> None:
        self._core = core

    def endpoint(self, app_version: str, endpoint_token: str) -> ThingRecord:
        """The endpoint named by an application version and endpoint token.

        Raises:
            KaaError: 401 for an unknown token (or one of another application version).
        """
        thing = self._core.registry.kaa_endpoint(app_version, endpoint_token)
        if thing is None:
            raise KaaError(401, "unknown endpoint token for this application version")
        return thing

    async def outstanding(self, thing: ThingRecord, command_type: str) -> list[dict[str, Any]]:
        """Every outstanding command of this type, ``[{"id", "payload"}]``, oldest first.

        Handing a command to the device (in this answer) makes a QUEUED one SENT.
        """
        check_command_type(command_type)
        self._core.registry.device_seen(thing.thing_id)
        out = []
        for execution in await self._core.store.outstanding(thing.thing_id, command_type, now_ms()):
            if execution.status is Status.QUEUED:
                await self._core.store.transition(execution.execution_id, Trigger.PUBLISHED, at_ms=now_ms())
            payload = json.loads(execution.params_json) if execution.params_json else {}
            out.append({"id": execution.kaa_id, "payload": payload})
        return out

    async def report(self, thing: ThingRecord, command_type: str, body: Any) -> list[ItemOutcome]:
        """Apply a result array (or a single result object); valid items count even when others are bad.

        Raises:
            KaaError: 400 when the body is neither an object nor an array of them.
        """
        check_command_type(command_type)
        self._core.registry.device_seen(thing.thing_id)
        items = [body] if isinstance(body, dict) else body
        if not isinstance(items, list) or not items:
            raise KaaError(400, "a result is an object or a non-empty array of objects")
        return [await self._apply(thing, command_type, item) for item in items]

    async def _apply(self, thing: ThingRecord, command_type: str, item: Any) -> ItemOutcome:
        if not isinstance(item, dict):
            return ItemOutcome(None, "item is not an object")
        kaa_id, code = item.get("id"), item.get("statusCode")
        if type(kaa_id) is not int or kaa_id < 1:
            return ItemOutcome(kaa_id, "id must be a positive integer")
        if type(code) is not int:
            return ItemOutcome(kaa_id, "statusCode must be an integer")
        phrase = item.get("reasonPhrase", "")
        if not isinstance(phrase, str) or len(phrase) > MAX_REASON_PHRASE:
            return ItemOutcome(kaa_id, f"reasonPhrase must be a string of at most {MAX_REASON_PHRASE} characters")
        execution_id = await self._core.store.execution_id_for_kaa(thing.thing_id, command_type, kaa_id)
        if execution_id is None:
            self._core.stats["dropped.unknown_execution"] += 1
            return ItemOutcome(kaa_id, f"no command {kaa_id} of type {command_type!r} for this endpoint")
        payload = json.dumps(item["payload"], separators=(",", ":"), ensure_ascii=False) if "payload" in item else None
        report = DeviceReport(status_for(code), payload, Reason(str(code), phrase))
        try:
            result = await self._core.store.transition(
                execution_id,
                Trigger.DEVICE_REPORT,
                at_ms=now_ms(),
                report=report,
                expect_thing=thing.thing_id,
                result_check=self._core.registry.result_check,
            )
        except (NotFound, ThingMismatch) as exc:  # pragma: no cover - the id was just looked up for this thing
            return ItemOutcome(kaa_id, str(exc))
        self._core.stats[f"reports.{result.decision.outcome.value}"] += 1
        if result.decision.outcome is Outcome.LATE:
            log.info("late Kaa result %s for %s kept in history", code, execution_id)
        return ItemOutcome(kaa_id, None)
