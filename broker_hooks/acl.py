"""Per-device topic ACL for the embedded broker.

A device may subscribe only with the filters its dialects declare for it and
publish only to the topics they declare, in both cases with its own id (the
MQTT client id) in the ``{thing}`` level. Everything else is denied: amqtt
answers a denied SUBSCRIBE with return code 0x80 and drops a denied PUBLISH
(``FleetBroker`` counts it). Deliveries from the service (``Action.RECEIVE``)
are always allowed; the service itself never goes through the ACL.

amqtt treats a topic plugin's ``None`` as *deny*, so every answer is a bool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from broker_hooks.rules import THING, Dialect, TopicPattern
from broker_hooks.topics import level_problem

log = logging.getLogger(__name__)


class TopicAcl:
    """Which topics a device may publish to and subscribe with, from the dialects' declarations."""

    def __init__(self, publish: Sequence[TopicPattern], subscribe: Sequence[TopicPattern]) -> None:
        self.publish = tuple(publish)
        self.subscribe = tuple(subscribe)

    @classmethod
    def of(cls, dialects: Sequence[Dialect]) -> TopicAcl:
        """The ACL of every device topic ``dialects`` declare."""
        return cls(
            [p for d in dialects for p in d.device_publish],
            [p for d in dialects for p in d.device_subscribe],
        )

    def may_publish(self, client_id: str, topic: str) -> bool:
        """Whether ``client_id`` may publish to ``topic`` (a topic name, no wildcards)."""
        if level_problem(client_id) is not None:
            return False
        for pattern in self.publish:
            captured = pattern.match(topic)
            if captured is not None and captured.get(THING) == client_id:
                return True
        return False

    def may_subscribe(self, client_id: str, topic_filter: str) -> bool:
        """Whether ``client_id`` may subscribe with ``topic_filter``."""
        # An id with '+', '#', '/' or a leading '$' could match other things' levels: never.
        if level_problem(client_id) is not None:
            return False
        for pattern in self.subscribe:
            captured = pattern.match_filter(topic_filter)
            if captured is not None and captured.get(THING) == client_id:
                return True
        return False


class DeviceAclPlugin(BaseTopicPlugin):
    """amqtt topic plugin applying a :class:`TopicAcl` to every client, identified by its client id."""

    @dataclass
    class Config:
        """``acl``: the :class:`TopicAcl` (passed as an object; amqtt keeps its identity)."""

        acl: Any = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        if not isinstance(self.config.acl, TopicAcl):
            raise TypeError("DeviceAclPlugin needs an 'acl' (TopicAcl) in its config")
        self.acl: TopicAcl = self.config.acl

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        """Allow a device its own topics only; always a bool (amqtt reads None as deny)."""
        if action == Action.RECEIVE:
            return True
        if session is None or topic is None:
            return False
        client_id = session.client_id or ""
        if action == Action.SUBSCRIBE:
            allowed = self.acl.may_subscribe(client_id, topic)
        elif action == Action.PUBLISH:
            allowed = self.acl.may_publish(client_id, topic)
        else:
            allowed = False
        if not allowed:
            log.debug("ACL: client %r may not %s %r", client_id, getattr(action, "value", action), topic)
        return allowed
