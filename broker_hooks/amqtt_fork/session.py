"""Lighter per-connection objects for amqtt 0.12.1: sessions, their queues, the protocol handler.

A connected device costs amqtt about 50 KB and most of a millisecond of CPU
before it has sent a byte of application data. The bulk of it is bookkeeping
that a broker holding thousands of idle devices does not need:

* every ``Session`` builds a ``transitions.Machine`` for its three states
  (new, connected, disconnected): about 15 KB and 0.2-0.6 ms per CONNECT.
  :class:`SessionState` is the same state machine as a two-slot object, with
  the same API (``state``, ``connect()``, ``disconnect()``, ``is_<state>()``),
  the same enter callbacks and the same ``MachineError`` on a refused
  transition (``IndexedBroker._handle_client_session`` relies on it for take-over);
* every session and handler holds two ``asyncio.Queue`` each, and an empty
  ``asyncio.Queue`` is four deques (about 3 KB). :class:`LightQueue` allocates
  nothing until something is queued, and lets a waiter be woken by a put
  without a task blocked in ``get()`` (the broker's message loop uses that).

:class:`FleetSession` and :class:`FleetProtocolHandler` use both; ``FleetBroker``
creates every client session through :meth:`FleetProtocolHandler.init_from_connect`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Literal, TypeVar

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.errors import MQTTError, ProtocolHandlerError
from amqtt.events import MQTTEvents
from amqtt.mqtt.connack import (
    BAD_USERNAME_PASSWORD,
    IDENTIFIER_REJECTED,
    UNACCEPTABLE_PROTOCOL_VERSION,
    ConnackPacket,
)
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import (
    _MQTT_PROTOCOL_LEVEL_SUPPORTED,
    BrokerProtocolHandler,
    Subscription,
    UnSubscription,
)
from amqtt.plugins.manager import PluginManager
from amqtt.session import ApplicationMessage, OutgoingApplicationMessage, Session
from amqtt.utils import format_client_message
from transitions import MachineError

from broker_hooks.amqtt_fork.limits import MQTT_MAX_PACKET, read_connect

_T = TypeVar("_T")

# The logger amqtt's handlers log to (amqtt.mqtt.protocol.handler), shared by every FleetProtocolHandler.
_HANDLER_LOG = logging.getLogger("amqtt.mqtt.protocol.handler")

NEW = "new"
CONNECTED = "connected"
DISCONNECTED = "disconnected"


class SessionState:
    """The session state machine of amqtt (``Session._init_states``) without ``transitions.Machine``.

    Transitions, as amqtt declares them: ``connect`` from new or disconnected to connected,
    ``disconnect`` from any state to disconnected (re-entering disconnected too). Entering a
    state runs the session's ``_on_enter_<state>`` callback, as the Machine did; a refused
    ``connect`` raises ``MachineError`` with the Machine's message.
    """

    __slots__ = ("_session", "state")

    def __init__(self, session: Session, state: str = NEW) -> None:
        self._session = session
        self.state = state

    def connect(self) -> bool:
        """Enter ``connected``.

        Returns:
            True, like a ``transitions`` trigger that ran.

        Raises:
            MachineError: the session is already connected.
        """
        if self.state == CONNECTED:
            msg = f"Can't trigger event connect from state {self.state}!"
            raise MachineError(msg)
        self.state = CONNECTED
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        """Enter ``disconnected`` (allowed from every state).

        Returns:
            True, like a ``transitions`` trigger that ran.
        """
        self.state = DISCONNECTED
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        """Whether the session never connected."""
        return self.state == NEW

    def is_connected(self) -> bool:
        """Whether the session is connected."""
        return self.state == CONNECTED

    def is_disconnected(self) -> bool:
        """Whether the session was connected and is no more."""
        return self.state == DISCONNECTED

    def __repr__(self) -> str:
        return f"SessionState(state={self.state!r})"


class LightQueue(asyncio.Queue[_T]):
    """An unbounded FIFO with ``asyncio.Queue``'s API that allocates nothing while empty.

    ``asyncio.Queue.__init__`` is deliberately not called: it builds three deques and an
    ``Event`` per queue, which is most of the memory of an idle connection. Items live in a
    deque created on the first put and dropped when the queue empties. Waiting is a list of
    futures that every put resolves; besides ``get()``, :meth:`add_waiter` lets one future
    wait on several queues at once without a task per queue.
    """

    def __init__(self) -> None:
        self._items: collections.deque[_T] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None
        self._unfinished = 0
        self._joiners: list[asyncio.Future[None]] | None = None

    def __repr__(self) -> str:
        return f"<LightQueue qsize={self.qsize()}>"

    __str__ = __repr__

    @property
    def maxsize(self) -> int:
        """Always 0: unbounded, as amqtt creates its session and handler queues."""
        return 0

    def qsize(self) -> int:
        """Number of items queued."""
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        """Whether nothing is queued."""
        return not self._items

    def full(self) -> bool:
        """Never: the queue is unbounded."""
        return False

    def add_waiter(self, waiter: asyncio.Future[None]) -> None:
        """Resolve ``waiter`` (with None) at the next put; it is forgotten once resolved."""
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)

    def discard_waiter(self, waiter: asyncio.Future[None]) -> None:
        """Forget ``waiter`` if it is still waiting for a put."""
        if self._waiters is not None and waiter in self._waiters:
            self._waiters.remove(waiter)
            if not self._waiters:
                self._waiters = None

    def put_nowait(self, item: _T) -> None:
        """Queue ``item`` and wake every waiter."""
        if self._items is None:
            self._items = collections.deque()
        self._items.append(item)
        self._unfinished += 1
        waiters, self._waiters = self._waiters, None
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def put(self, item: _T) -> None:
        """Queue ``item`` (never blocks: the queue is unbounded)."""
        self.put_nowait(item)

    def get_nowait(self) -> _T:
        """The oldest item.

        Raises:
            asyncio.QueueEmpty: nothing is queued.
        """
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    async def get(self) -> _T:
        """The oldest item, waiting for one if needed."""
        while not self._items:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.add_waiter(waiter)
            try:
                await waiter
            finally:
                # Every put wakes every waiter, so a cancelled getter strands no item.
                self.discard_waiter(waiter)
        return self.get_nowait()

    def task_done(self) -> None:
        """Mark one item as processed (``join`` returns when every queued item was).

        Raises:
            ValueError: called more times than items were queued.
        """
        if self._unfinished <= 0:
            msg = "task_done() called too many times"
            raise ValueError(msg)
        self._unfinished -= 1
        if self._unfinished == 0 and self._joiners:
            joiners, self._joiners = self._joiners, None
            for joiner in joiners:
                if not joiner.done():
                    joiner.set_result(None)

    async def join(self) -> None:
        """Wait until every queued item was marked done."""
        if self._unfinished == 0:
            return
        joiner: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._joiners is None:
            self._joiners = []
        self._joiners.append(joiner)
        await joiner


class LightEvent(asyncio.Event):
    """``asyncio.Event`` without its deque: the waiter list exists only while someone waits.

    Each protocol handler holds two events (reader ready, reader stopped) that are waited on
    once, if at all; an empty ``asyncio.Event`` is a 700-byte deque.
    """

    def __init__(self) -> None:
        self._value = False
        self._light_waiters: list[asyncio.Future[bool]] | None = None

    def __repr__(self) -> str:
        return f"<LightEvent {'set' if self._value else 'unset'}>"

    def is_set(self) -> bool:
        """Whether the event is set."""
        return self._value

    def set(self) -> None:
        """Set the event and wake every waiter."""
        if self._value:
            return
        self._value = True
        waiters, self._light_waiters = self._light_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        """Unset the event."""
        self._value = False

    async def wait(self) -> Literal[True]:
        """Wait until the event is set.

        Returns:
            True, as ``asyncio.Event.wait``.
        """
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._light_waiters is None:
            self._light_waiters = []
        self._light_waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._light_waiters is not None and waiter in self._light_waiters:
                self._light_waiters.remove(waiter)
        return True


class FleetSession(Session):
    """An amqtt ``Session`` with a :class:`SessionState` and :class:`LightQueue` queues."""

    # A persistent session's un-acked outgoing messages (handler.KeptMessage), from the connection
    # that ended to the next one, which sends them again [MQTT-4.4.0-1]. A class default, so that
    # a session with nothing kept carries no attribute (memory per connection).
    kept_out: list[OutgoingApplicationMessage] | None = None

    def __init__(self) -> None:
        super().__init__()
        # Session.__init__ builds two asyncio.Queues (about 6 KB); these cost nothing while empty.
        self.retained_messages: asyncio.Queue[ApplicationMessage] = LightQueue()
        self.delivered_message_queue: asyncio.Queue[ApplicationMessage] = LightQueue()

    def _init_states(self) -> None:
        # amqtt builds a transitions.Machine here; SessionState has the same API and behaviour.
        self.transitions = SessionState(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled session, with light queues."""
        super().__setstate__(state)
        self.retained_messages = LightQueue()
        self.delivered_message_queue = LightQueue()


class FleetProtocolHandler(BrokerProtocolHandler):
    """amqtt's ``BrokerProtocolHandler`` with :class:`LightQueue` queues, creating :class:`FleetSession`."""

    # Declared again: mypy cannot infer the base class's attribute through amqtt's import cycle.
    _disconnect_waiter: asyncio.Future[DisconnectPacket | None] | None

    def __init__(
        self,
        plugins_manager: PluginManager[Any],
        session: Session | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(plugins_manager, session, loop)
        self._pending_subscriptions: asyncio.Queue[Subscription] = LightQueue()
        self._pending_unsubscriptions: asyncio.Queue[UnSubscription] = LightQueue()
        self._reader_stopped = LightEvent()

    def _init_session(self, session: Session) -> None:
        super()._init_session(session)
        # amqtt wraps the module logger in a LoggerAdapter per connection (about 800 bytes) only to
        # carry the client id as an ``extra`` that no fleetcmd log format prints.
        self.logger = _HANDLER_LOG

    async def start(self) -> None:
        """Amqtt's ``ProtocolHandler.start`` and ``BrokerProtocolHandler.start`` (0.12.1), with light events.

        Raises:
            ProtocolHandlerError: the handler is not attached to a session and stream.
        """
        if not self._is_attached():
            msg = "Handler is not attached to a stream"
            raise ProtocolHandlerError(msg)
        self._reader_ready = LightEvent()
        self._reader_stopped = LightEvent()
        self._reader_task = asyncio.create_task(self._reader_loop())
        await self._reader_ready.wait()
        if self._loop is not None and self.keepalive_timeout is not None:
            self._keepalive_task = self._loop.call_later(self.keepalive_timeout, self.handle_write_timeout)
        await self._retry_deliveries()
        # BrokerProtocolHandler.start: a fresh disconnect waiter.
        if self._disconnect_waiter is None or self._disconnect_waiter.done():
            self._disconnect_waiter = asyncio.Future()

    @classmethod
    async def init_from_connect(
        cls,
        reader: ReaderAdapter,
        writer: WriterAdapter,
        plugins_manager: PluginManager[Any],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_packet_bytes: int = MQTT_MAX_PACKET,
    ) -> tuple[FleetProtocolHandler, FleetSession]:
        """Amqtt's ``BrokerProtocolHandler.init_from_connect`` (0.12.1), creating a :class:`FleetSession`.

        Reads and validates the CONNECT; refusals that amqtt answers itself (protocol level,
        malformed credentials, persistent session without a client id) get their CONNACK and
        raise ``MQTTError`` as upstream. ``tests/test_broker_scaling.py`` pins the upstream source.
        Unlike upstream, which decodes whatever comes first as a CONNECT (a PUBLISH first then
        waits for bytes that never come), the first packet must be a CONNECT of at most
        ``max_packet_bytes`` (:func:`broker_hooks.amqtt_fork.limits.read_connect`).

        Raises:
            FirstPacketError: the first packet is not a CONNECT, is malformed or too large, or never came whole.
            MQTTError: the CONNECT is refused.
        """
        connect = await read_connect(reader, max_packet_bytes)
        await plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=connect)

        if connect.variable_header is None:
            msg = "CONNECT packet: variable header not initialized."
            raise MQTTError(msg)
        if connect.payload is None:
            msg = "CONNECT packet: payload not initialized."
            raise MQTTError(msg)
        # [MQTT-3.1.3-6]
        if connect.payload.client_id is None:
            msg = "[[MQTT-3.1.3-3]] : Client identifier must be present"
            raise MQTTError(msg)
        if connect.variable_header.will_flag and (connect.payload.will_topic is None or connect.payload.will_message is None):
            msg = "Will flag set, but will topic/message not present in payload"
            raise MQTTError(msg)
        if connect.variable_header.reserved_flag:
            msg = "[MQTT-3.1.2-3] CONNECT reserved flag must be set to 0"
            raise MQTTError(msg)
        if connect.proto_name != "MQTT":
            msg = f'[MQTT-3.1.2-1] Incorrect protocol name: "{connect.proto_name}"'
            raise MQTTError(msg)

        remote_info = writer.get_peer_info()
        if remote_info is not None:
            remote_address, remote_port = remote_info
            connack = None
            error_msg = None
            if connect.proto_level != _MQTT_PROTOCOL_LEVEL_SUPPORTED:
                # only MQTT 3.1.1 supported
                error_msg = (
                    f"Invalid protocol from {format_client_message(address=remote_address, port=remote_port)}:"
                    f" {connect.proto_level}"
                )
                connack = ConnackPacket.build(0, UNACCEPTABLE_PROTOCOL_VERSION)  # [MQTT-3.2.2-4] session_parent=0
            elif not connect.username_flag and connect.password_flag:
                connack = ConnackPacket.build(0, BAD_USERNAME_PASSWORD)  # [MQTT-3.1.2-22]
            elif connect.username_flag and connect.username is None:
                error_msg = f"Invalid username from {format_client_message(address=remote_address, port=remote_port)}"
                connack = ConnackPacket.build(0, BAD_USERNAME_PASSWORD)  # [MQTT-3.2.2-4] session_parent=0
            elif connect.password_flag and connect.password is None:
                error_msg = f"Invalid password from {format_client_message(address=remote_address, port=remote_port)}"
                connack = ConnackPacket.build(0, BAD_USERNAME_PASSWORD)  # [MQTT-3.2.2-4] session_parent=0
            elif connect.clean_session_flag is False and connect.payload.client_id_is_random:
                error_msg = (
                    f"[MQTT-3.1.3-8] [MQTT-3.1.3-9] {format_client_message(address=remote_address, port=remote_port)}:"
                    " No client Id provided (cleansession=0)"
                )
                connack = ConnackPacket.build(0, IDENTIFIER_REJECTED)

            if connack is not None:
                await plugins_manager.fire_event(MQTTEvents.PACKET_SENT, packet=connack)
                await connack.to_stream(writer)
                await writer.close()
                raise MQTTError(error_msg) from None

        incoming_session = FleetSession()
        incoming_session.client_id = connect.client_id
        incoming_session.clean_session = connect.clean_session_flag
        incoming_session.will_flag = connect.will_flag
        incoming_session.will_retain = connect.will_retain_flag
        incoming_session.will_qos = connect.will_qos
        incoming_session.will_topic = connect.will_topic
        incoming_session.will_message = connect.will_message
        incoming_session.username = connect.username
        incoming_session.password = connect.password
        # amqtt leaves these unbound when the peer info is missing (a NameError); None is what it means.
        incoming_session.remote_address = remote_address if remote_info is not None else None
        incoming_session.remote_port = remote_port if remote_info is not None else None
        incoming_session.ssl_object = writer.get_ssl_info()
        incoming_session.keep_alive = max(connect.keep_alive, 0)

        handler = cls(plugins_manager, loop=loop)
        return handler, incoming_session


def light_queue(owner: object, name: str) -> LightQueue[Any]:
    """The :class:`LightQueue` in ``owner.<name>``, swapping in one (with the items, in order) for an ``asyncio.Queue``.

    Sessions and handlers that amqtt built itself (``create_offline_session``, a stock
    ``IndexedBroker``) carry ``asyncio.Queue``s; the message loop needs the light kind.
    amqtt reads the attribute on every use, so swapping it is seen at once.
    """
    queue = getattr(owner, name)
    if isinstance(queue, LightQueue):
        return queue
    light: LightQueue[Any] = LightQueue()
    while not queue.empty():
        light.put_nowait(queue.get_nowait())
    setattr(owner, name, light)
    return light


def slim_stream(writer: object) -> None:
    """Give an asyncio stream connection's drain-waiter container the size of its use.

    ``asyncio.StreamReaderProtocol`` keeps a deque (about 700 bytes) for coroutines waiting
    in ``drain()``, which is empty unless the socket's send buffer is full. A list does the
    same job (append, remove, iterate) for 56 bytes. ``writer`` is amqtt's writer adapter; for
    other transports (WebSocket) or another asyncio layout this does nothing.
    """
    stream = getattr(writer, "_writer", None)
    protocol = getattr(stream, "_protocol", None)
    if isinstance(protocol, asyncio.streams.FlowControlMixin):
        waiters = getattr(protocol, "_drain_waiters", None)
        if type(waiters) is collections.deque and not waiters:
            protocol._drain_waiters = []  # type: ignore[attr-defined]
