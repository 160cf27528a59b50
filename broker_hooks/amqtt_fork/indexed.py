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
  debug log line, even with debug logging off;
* every PUBLISH goes through a broadcast queue to a task that tests every
  filter in the broker against its topic (formatting a debug line for each
  that does not match), then starts one task per subscriber; plugin events
  are fired for it even when no plugin listens.

This class keeps a per-client index of granted filters and uses it on those
paths, evaluates a :class:`~broker_hooks.acl.TopicAcl` directly, and routes a
message at once through a :class:`~broker_hooks.router.TopicRouter` (which
looks only at the matching filters) to the subscribers' handlers, which write
it at once when they can (:class:`~broker_hooks.amqtt_fork.handler.FastProtocolHandler`).
Behaviour is otherwise amqtt's; ``tests/test_broker_scaling.py`` pins the
upstream code and ``tests/test_broker_fastpath.py`` the routing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import ApplicationMessage, Session
from transitions import MachineError

from broker_hooks.acl import DeviceAclPlugin, TopicAcl
from broker_hooks.amqtt_fork.handler import FastProtocolHandler
from broker_hooks.amqtt_fork.session import light_queue, slim_stream
from broker_hooks.router import TopicRouter
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
        self._acl: TopicAcl | None = next((p.acl for p in self.plugins_manager.plugins if isinstance(p, DeviceAclPlugin)), None)
        # Every filter in self._subscriptions, indexed by topic level: a publish looks only at its matches.
        self._router = TopicRouter()
        # Tasks publishing to one subscriber each (when the handler cannot write at once), until done.
        self._publish_tasks: set[asyncio.Future[Any]] = set()
        # Events some plugin listens to: fire_event() for the others would only build its arguments.
        callbacks = self.plugins_manager._event_plugin_callbacks
        self._listened: frozenset[str] = frozenset(event for event, methods in callbacks.items() if methods)

    # ---- subscriptions --------------------------------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """Subscribe as amqtt does, and index the granted filter under the client and in the router."""
        granted: int = await super().add_subscription(subscription, session)
        if granted != SUBACK_FAILURE:
            self._router.add(subscription[0])
            if session.client_id:
                self._client_filters.setdefault(session.client_id, {})[subscription[0]] = granted
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        filters = self._client_filters.get(session.client_id or "")
        if filters is not None:
            filters.pop(a_filter, None)
        deleted: int = super()._del_subscription(a_filter, session)
        self._drop_if_unused(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        # amqtt walks every filter of every client; the index names this client's own.
        for topic_filter in list(self._client_filters.pop(session.client_id or "", {})):
            super()._del_subscription(topic_filter, session)
            self._drop_if_unused(topic_filter)

    def _drop_if_unused(self, topic_filter: str) -> None:
        # amqtt leaves an empty list behind after an UNSUBSCRIBE (and drops it on a disconnect);
        # here both drop it, so neither the table nor the router keeps filters nobody holds.
        if not self._subscriptions.get(topic_filter, True):
            del self._subscriptions[topic_filter]
            self._router.discard(topic_filter)

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

    # ---- message routing ------------------------------------------------------------------

    async def start(self) -> None:
        """Start as amqtt does (which empties the subscription table), with an empty router."""
        self._router.clear()
        await super().start()

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        """A message the client's message loop took from its queue; False ends the loop (amqtt's contract)."""
        app_message = wait_deliver.result()
        try:
            return await self._process_message(client_session, handler, app_message) is not False
        finally:
            if isinstance(handler, FastProtocolHandler):
                handler.deferred_done(app_message)

    async def publish_inline(self, client_session: Session, handler: BrokerProtocolHandler, message: ApplicationMessage) -> bool:
        """Handle a PUBLISH in the connection's reader, without the hop through the message loop.

        Returns:
            True when it was handled; False when it has to go through the message loop
            (its handling may end the connection or wait on the control plane).
        """
        return await self._process_message(client_session, handler, message, inline=True) is not None

    async def _process_message(
        self,
        client_session: Session,
        handler: BrokerProtocolHandler,
        app_message: ApplicationMessage | None,
        *,
        inline: bool = False,
    ) -> bool | None:
        """Amqtt's ``_handle_message_delivery`` (0.12.1) for one message, routed without the broadcast queue.

        Plugin events are fired only when a plugin listens to them. With ``inline`` (called from
        the reader, see :meth:`publish_inline`), a message whose handling would end the client's
        message loop is not handled: the return value is then None and the caller queues it.

        Returns:
            False when the message loop must stop (amqtt's answer to an invalid topic), None
            (only with ``inline``) when the message must go through the message loop, else True.
        """
        topic = app_message.topic if app_message is not None else None
        invalid = app_message is not None and (not topic or "#" in topic or "+" in topic or topic.startswith("$"))
        if inline and invalid:
            return None
        if BrokerEvents.MESSAGE_RECEIVED in self._listened:
            # Notify of a message's receipt, even if the client isn't necessarily allowed to send it.
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_RECEIVED, client_id=client_session.client_id, message=app_message
            )
        if app_message is None or topic is None:
            return True
        if invalid:
            log.warning("[MQTT-4.7.3-1/3.3.2-2/4.7.2-1] %s: invalid topic %r in PUBLISH", client_session.client_id, topic)
            return False
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            log.info("%s not allowed to publish to topic %s", client_session.client_id, topic)
            return True
        if BrokerEvents.MESSAGE_BROADCAST in self._listened:
            await self.plugins_manager.fire_event(
                BrokerEvents.MESSAGE_BROADCAST, client_id=client_session.client_id, message=app_message
            )
        await self._broadcast_message(client_session, topic, app_message.data)
        if app_message.publish_packet is not None and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)
        return True

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        """Amqtt's ``_run_broadcast`` (0.12.1) for one message, run at once for the matching filters only.

        amqtt queues the message for a broadcast task, which tests every filter in the broker
        (and formats a debug line for each that does not match) and starts a task per
        subscriber. Here the router names the matching filters, and each connected subscriber's
        handler writes the PUBLISH at once when it can (``FastProtocolHandler.publish_nowait``),
        else through a task as amqtt does. The caller's order is kept: a publisher's messages
        are routed one after the other, in its own message handling.
        """
        if topic is None or data is None:
            # amqtt's broadcast task would fail on it; nothing can be delivered.
            log.warning("broadcast without topic or payload from %s dropped", session.client_id if session else None)
            return
        matches = self._router.match(topic)
        if not matches:
            return
        # Without a topic plugin (or with the inline ACL, which always lets a client receive), amqtt's check is True.
        receive_check = self._acl is None and bool(self.plugins_manager._topic_plugins)
        for topic_filter in matches:
            subscriptions = self._subscriptions.get(topic_filter)
            if not subscriptions:
                continue
            # A copy: the table may change while this awaits (amqtt would fail with "dict changed size").
            for target_session, sub_qos in tuple(subscriptions):
                qos = sub_qos if force_qos is None else force_qos
                if receive_check and not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                    log.info("%s not allowed to receive messages from topic %s", target_session.client_id, topic)
                    continue
                if target_session.transitions.state != "connected":
                    # Kept for an offline persistent session [MQTT 3.1.2.4], except QoS 0 and anonymous ones, as amqtt.
                    if not target_session.clean_session and qos in (QOS_1, QOS_2) and not target_session.is_anonymous:
                        broadcast = {"session": session, "topic": topic, "data": data}
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                entry = self._sessions.get(target_session.client_id or "")
                if entry is not None:
                    self._publish_to(entry[1], topic, data, qos)

    def _publish_to(self, handler: BrokerProtocolHandler, topic: str, data: bytes | bytearray, qos: int) -> None:
        if isinstance(handler, FastProtocolHandler) and handler.publish_nowait(topic, data, qos):
            return
        task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
        if isinstance(handler, FastProtocolHandler):
            handler.track_publish(task)
        self._publish_tasks.add(task)
        task.add_done_callback(self._publish_finished)

    def _publish_finished(self, task: asyncio.Future[Any]) -> None:
        self._publish_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # amqtt logs a failed delivery (no PUBACK in 5 s, connection lost) and carries on.
            log.info("publish to a subscriber failed: %r", exc)

    async def _shutdown_broadcast_loop(self) -> None:
        for task in list(self._publish_tasks):
            task.cancel()
        if self._publish_tasks:
            await asyncio.wait(list(self._publish_tasks), timeout=5)
        await super()._shutdown_broadcast_loop()

    # ---- ACL ------------------------------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self._acl is None:
            if not self.plugins_manager._topic_plugins:
                return True  # amqtt's answer without a topic plugin: all() of no results
            allowed: bool = await super()._topic_filtering(session, topic, action)
            return allowed
        # The same decision DeviceAclPlugin makes, without a task per check.
        return action == Action.RECEIVE or self._acl.allows(session, topic, action)

    # ---- connections ----------------------------------------------------------------------

    # Subclasses hook into a connection's life through these two plain methods, not by wrapping
    # the coroutines below: a coroutine that awaits another stays alive, frame and all, for as long
    # as the connection does (about 300 bytes on every connected device for each wrapper).

    def _connect_verdict(self, handler: BrokerProtocolHandler) -> bool | None:
        """The authentication decided while the CONNECT was read, if any.

        False: refused already (its CONNACK sent), nothing more runs for it; True: authenticated
        already, so amqtt's own ``_authenticate`` is not run a second time (every auth plugin would
        be called twice per CONNECT); None: not decided, authenticate here as amqtt does.
        """
        return None

    def _session_connected(self, client_session: Session) -> None:
        """Called once the client is connected and its retained messages are queued, before its message loop."""

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
        persistent subscriptions are looked at, and only when retained messages exist; a CONNECT
        authenticated while it was read is not authenticated again; and the two hooks above.
        """
        authenticated = self._connect_verdict(handler)
        if authenticated is False:
            return
        if authenticated is None:
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
        slim_stream(writer)
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
        self._session_connected(client_session)
        await self._client_message_loop(client_session, handler)

    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        """Amqtt's ``_client_message_loop`` (0.12.1) without a task per input and without ``repr(self._subscriptions)``.

        amqtt keeps four tasks per connection alive for the whole connection (waiting for the
        disconnect, the next SUBSCRIBE, UNSUBSCRIBE and PUBLISH), and builds the repr of the whole
        subscription table, O(fleet), on every SUBSCRIBE for a debug line. Here the connection's
        own task polls the handler's queues (:class:`~broker_hooks.amqtt_fork.session.LightQueue`) and, when
        all are empty, sleeps on one future that a put or the disconnect resolves.

        Each round handles what amqtt's round would: the disconnect, then one subscription, one
        unsubscription and one published message, in that order. When the client has disconnected,
        the messages it published before are all still handled (amqtt handles at most one and
        drops the rest, though the client got its PUBACKs).
        """
        subscriptions = light_queue(handler, "_pending_subscriptions")
        unsubscriptions = light_queue(handler, "_pending_unsubscriptions")
        deliveries = light_queue(client_session, "delivered_message_queue")
        inputs = (subscriptions, unsubscriptions, deliveries)
        loop = asyncio.get_running_loop()
        # What amqtt's wait_disconnect() awaits; None when the handler was stopped already.
        disconnected: asyncio.Future[Any] | None = handler._disconnect_waiter
        if disconnected is None:
            disconnected = loop.create_future()
            disconnected.set_result(None)
        running = True
        while running:
            try:
                if not (disconnected.done() or subscriptions.qsize() or unsubscriptions.qsize() or deliveries.qsize()):
                    # Sleep until a put or the disconnect (inline: a helper coroutine's frame would stay
                    # alive for as long as the device is idle, on every connection).
                    wake: asyncio.Future[None] = loop.create_future()
                    on_disconnect = functools.partial(_resolve, wake)
                    for queue in inputs:
                        queue.add_waiter(wake)
                    disconnected.add_done_callback(on_disconnect)
                    try:
                        await wake
                    finally:
                        for queue in inputs:
                            queue.discard_waiter(wake)
                        disconnected.remove_done_callback(on_disconnect)
                if disconnected.done():
                    await self._handle_disconnect(client_session, handler, disconnected)
                    running = False
                if subscriptions.qsize():
                    await self._handle_subscription(client_session, handler, _resolved(loop, subscriptions.get_nowait()))
                if unsubscriptions.qsize():
                    await self._handle_unsubscription(client_session, handler, _resolved(loop, unsubscriptions.get_nowait()))
                while deliveries.qsize():
                    if not await self._handle_message_delivery(client_session, handler, _resolved(loop, deliveries.get_nowait())):
                        running = False
                        break
                    if running:
                        break  # one per round while connected, like amqtt
            except asyncio.CancelledError:
                break


def _resolve(future: asyncio.Future[None], _: object) -> None:
    if not future.done():
        future.set_result(None)


def _resolved(loop: asyncio.AbstractEventLoop, value: Any) -> asyncio.Future[Any]:
    """A done future holding ``value``: what amqtt's handlers take (they call ``.result()`` on their waiter)."""
    future: asyncio.Future[Any] = loop.create_future()
    future.set_result(value)
    return future
