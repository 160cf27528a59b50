"""``IndexedBroker``: amqtt 0.12.1's ``Broker`` with the fleet-sized loops taken out.

amqtt keeps one global ``filter -> [(session, qos)]`` dictionary and walks it
whole on paths that concern a single client:

* every CONNECT awaits a retained-message lookup for *every* filter any client
  ever subscribed (``_handle_client_session``), so connecting N devices costs
  N x N awaits;
* every disconnect of a clean session walks every filter to find the client's
  own (``_del_all_subscriptions``);
* every ACL check goes through the plugin manager, which wraps each plugin
  call in its own task (``map_plugin_topic``);
* every SUBSCRIBE builds ``repr()`` of the whole subscription table for a
  debug log line, even with debug logging off.

This class keeps a per-client index of granted filters and uses it on those
paths, and evaluates a :class:`~broker_hooks.acl.TopicAcl` directly. Behaviour
is otherwise amqtt's; ``tests/test_broker_scaling.py`` pins both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from transitions import MachineError

from broker_hooks.acl import DeviceAclPlugin, TopicAcl
from broker_hooks.topics import filter_matches

log = logging.getLogger(__name__)

SUBACK_FAILURE = 0x80


class IndexedBroker(Broker):
    """A broker whose per-client work does not grow with the number of clients."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # client_id -> {filter: granted qos}; survives disconnects of persistent sessions like amqtt's own.
        self._client_filters: dict[str, dict[str, int]] = {}
        # The device ACL, evaluated inline (None: amqtt's plugin path, e.g. no ACL configured).
        self._acl: TopicAcl | None = next(
            (p.acl for p in self.plugins_manager.plugins if isinstance(p, DeviceAclPlugin)), None
        )

    # ---- subscriptions --------------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Subscribe as amqtt does, and index the granted filter under the client."""
        granted: int = await super().add_subscription(subscription, session)
        if granted != SUBACK_FAILURE and session.client_id:
            self._client_filters.setdefault(session.client_id, {})[subscription[0]] = granted
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        filters = self._client_filters.get(session.client_id or "")
        if filters is not None:
            filters.pop(a_filter, None)
        deleted: int = super()._del_subscription(a_filter, session)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        # amqtt walks every filter of every client; the index names this client's own.
        for topic_filter in list(self._client_filters.pop(session.client_id or "", {})):
            super()._del_subscription(topic_filter, session)
            if not self._subscriptions.get(topic_filter, True):
                del self._subscriptions[topic_filter]

    def client_filters(self, client_id: str) -> dict[str, int]:
        """The filters a client holds (granted QoS by filter); empty when none."""
        return self._client_filters.get(client_id, {})

    def subscription_qos(self, client_id: str, topic: str) -> int | None:
        """Highest QoS a connected client is subscribed with for ``topic``, None if it would not receive it."""
        if not self.is_connected(client_id):
            return None
        best: int | None = None
        for topic_filter, qos in self._client_filters.get(client_id, {}).items():
            if filter_matches(topic_filter, topic) and (best is None or qos > best):
                best = qos
        return best

    def is_connected(self, client_id: str) -> bool:
        """Whether a client with this id has a live connection."""
        entry = self._sessions.get(client_id)
        return entry is not None and entry[0].transitions.state == "connected"

    # ---- ACL ------------------------------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self._acl is None:
            allowed: bool = await super()._topic_filtering(session, topic, action)
            return allowed
        # The same decision DeviceAclPlugin makes, without a task per check.
        return action == Action.RECEIVE or self._acl.allows(session, topic, action)

    # ---- connections ----------------------------------------------------------------------

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: BrokerProtocolHandler,
        server: Any,
        listener_name: str,
    ) -> None:
        """Amqtt's ``_handle_client_session`` (0.12.1), except the retained-message step on connect.

        amqtt publishes, for every filter *any* client holds, the retained messages
        matching it to the connecting client; that is an await per filter in the whole
        broker (and sends other clients' retained topics). Here only the client's own
        persistent subscriptions are looked at, and only when retained messages exist.
        """
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        if client_session.client_id is None:
            msg = "Client ID was not correctly created/set."
            raise BrokerError(msg)
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    self.logger.warning(f"Client {client_session.client_id} is already connected, performing take-over.")
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                self.logger.warning(f"Client {client_session.client_id} is reconnecting too quickly, make it wait")
                await asyncio.sleep(1)
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id, client_session=client_session
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        if self._retained_messages:
            for topic_filter in list(self._client_filters.get(client_session.client_id, {})):
                await self._publish_retained_messages_for_subscription((topic_filter, QOS_0), client_session)
        await self._client_message_loop(client_session, handler)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """Amqtt's ``_client_message_loop`` (0.12.1) without its ``logger.debug(repr(self._subscriptions))``.

        That argument is built on every SUBSCRIBE even with debug logging off, and it is the
        repr of every session of every subscription: O(fleet) per subscribe.
        """
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        connected = True
        while connected:
            try:
                done, _ = await asyncio.wait(
                    [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if disconnect_waiter in done:
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    connected = False
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        break
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
            except asyncio.CancelledError:
                break
        pending_waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        for waiter in pending_waiters:
            waiter.cancel()
        await asyncio.gather(*pending_waiters, return_exceptions=True)
