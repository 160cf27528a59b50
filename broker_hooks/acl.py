"""Per-device topic ACL for the embedded broker.

A device may subscribe only with the filters its dialects declare for it and
publish only to the topics they declare, in both cases with its own id (the
MQTT client id) in the ``{thing}`` level. Everything else is denied: amqtt
answers a denied SUBSCRIBE with return code 0x80 and drops a denied PUBLISH
(``FleetBroker`` counts it). Deliveries from the service (``Action.RECEIVE``)
are always allowed; the service itself never goes through the ACL.

Some dialects carry the credential in the topic instead (Kaa: the endpoint
token). Their :class:`ScopedAcl` decides on its own: a client that connected
without MQTT credentials (admitted only for such dialects, see ``auth.py``)
gets *only* those topics, for any registered endpoint whose token it names,
and never the ``{thing}``-level topics of the other dialects; a client that
authenticated as a thing keeps its ``{thing}`` topics and also gets the scoped
topics of that thing's own endpoint. In development mode (``open_mode``) every
client is its client id and may use every registered endpoint's scoped topics.

amqtt treats a topic plugin's ``None`` as *deny*, so every answer is a bool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.session import Session

from broker_hooks.rules import THING, Dialect, TopicPattern
from broker_hooks.topics import level_problem

log = logging.getLogger(__name__)


class ScopedAcl(Protocol):
    """Device topics whose credential is part of the topic (Kaa: the endpoint token).

    ``owner`` None: any endpoint the topic names validly (a client without MQTT credentials);
    otherwise only the endpoint that is the thing ``owner``.
    """

    def may_publish(self, topic: str, owner: str | None) -> bool:
        """Whether the client may publish to ``topic``."""

    def may_subscribe(self, topic_filter: str, owner: str | None) -> bool:
        """Whether the client may subscribe with ``topic_filter``."""


class TopicAcl:
    """Which topics a device may publish to and subscribe with, from the dialects' declarations.

    ``scoped`` are the ACLs of token-scoped dialects (see the module docstring); ``open_mode`` is
    development mode (``allow_anonymous``).
    """

    def __init__(
        self,
        publish: Sequence[TopicPattern],
        subscribe: Sequence[TopicPattern],
        scoped: Sequence[ScopedAcl] = (),
        *,
        open_mode: bool = False,
    ) -> None:
        self.publish = tuple(publish)
        self.subscribe = tuple(subscribe)
        self.scoped = tuple(scoped)
        self.open_mode = open_mode

    @classmethod
    def of(cls, dialects: Sequence[Dialect], scoped: Sequence[ScopedAcl] = (), *, open_mode: bool = False) -> TopicAcl:
        """The ACL of every device topic ``dialects`` declare, plus the ``scoped`` ones."""
        return cls(
            [p for d in dialects for p in d.device_publish],
            [p for d in dialects for p in d.device_subscribe],
            scoped,
            open_mode=open_mode,
        )

    def may_publish(self, client_id: str | None, topic: str, *, any_endpoint: bool = False) -> bool:
        """Whether a client may publish to ``topic`` (a topic name, no wildcards).

        ``client_id`` is the thing the client authenticated as, None for a client without MQTT
        credentials (scoped topics of any endpoint only); ``any_endpoint`` widens the scoped topics
        of an authenticated client to every endpoint (development mode).
        """
        if client_id is not None and level_problem(client_id) is None:
            for pattern in self.publish:
                captured = pattern.match(topic)
                if captured is not None and captured.get(THING) == client_id:
                    return True
        owner = None if any_endpoint or client_id is None else client_id
        return any(scoped.may_publish(topic, owner) for scoped in self.scoped)

    def may_subscribe(self, client_id: str | None, topic_filter: str, *, any_endpoint: bool = False) -> bool:
        """Whether a client may subscribe with ``topic_filter`` (arguments as :meth:`may_publish`)."""
        # An id with '+', '#', '/' or a leading '$' could match other things' levels: never.
        if client_id is not None and level_problem(client_id) is None:
            for pattern in self.subscribe:
                captured = pattern.match_filter(topic_filter)
                if captured is not None and captured.get(THING) == client_id:
                    return True
        owner = None if any_endpoint or client_id is None else client_id
        return any(scoped.may_subscribe(topic_filter, owner) for scoped in self.scoped)

    def allows(self, session: Session, topic: str, action: Action) -> bool:
        """The decision for one client action (``Action.PUBLISH`` or ``Action.SUBSCRIBE``)."""
        credentials = bool(session.username) or session.password is not None
        return self.allows_client(session.client_id or "", credentials, topic, action)

    def allows_client(self, client_id: str, credentials: bool, topic: str, action: Action) -> bool:
        """:meth:`allows` for a client known by its id and whether it connected with credentials (an external broker's)."""
        if self.open_mode:
            identity: str | None = client_id
        else:
            # Admitted without credentials (auth.py allows that only for token-scoped dialects):
            # no thing identity, whatever the client id says.
            identity = client_id if credentials else None
        any_endpoint = self.open_mode or identity is None
        if action == Action.SUBSCRIBE:
            return self.may_subscribe(identity, topic, any_endpoint=any_endpoint)
        if action == Action.PUBLISH:
            return self.may_publish(identity, topic, any_endpoint=any_endpoint)
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
        allowed = action is not None and self.acl.allows(session, topic, action)
        if not allowed:
            log.debug("ACL: client %r may not %s %r", session.client_id, getattr(action, "value", action), topic)
        return allowed
