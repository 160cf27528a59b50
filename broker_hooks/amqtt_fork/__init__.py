"""The amqtt fork: everything fleetcmd copies from, overrides in, or re-implements of amqtt **0.12.1**.

amqtt 0.12.1 (pinned in ``pyproject.toml``) has defects that matter to a fleet broker (a ``$`` publish
leaves a zombie connection, keep-alive is not enforced, QoS 1 is never retried, a CONNECT is authenticated
after its client id already took over a session, per-client work walks the whole fleet, ``shutdown()`` can
hang on Python 3.11); the reasons are in ``shared/notes/amqtt-0.12.1.md`` and docs/development.md's "Why amqtt is
subclassed". This package is the only place amqtt's internals are touched:

* ``indexed``: :class:`IndexedBroker`, ``Broker`` with per-client indexes instead of fleet-wide loops;
* ``broker``: :class:`FleetBroker`, the broker fleetcmd embeds (listeners, connection caps, CONNECT,
  ``$`` topics, rule routing, keep-alive, direct delivery, bounded stop). It moved in whole: its own API
  (``deliver``, ``deliver_nowait``, ``disconnect_client``, ``listener_ports``, ``stats``) writes to the
  fork's handlers and reads the fork's session table, so a mixin outside would only hide that coupling and
  add an attribute lookup per call; its public names are re-exported by :mod:`broker_hooks.broker`;
* ``session``: :class:`FleetSession` (no ``transitions.Machine``), :class:`FleetProtocolHandler`,
  ``LightQueue``/``LightEvent`` (queues without their futures until used);
* ``handler``: :class:`FastProtocolHandler`, whose reader decodes PUBLISH/PUBACK/PINGREQ itself;
* ``limits``: the first-packet check and the bounded readers that wrap amqtt's reader adapters.

What is not amqtt-derived stays outside: the rule engine (``rules``), routing (``router``), ACL (``acl``),
authentication (``auth``), configuration (``config``), ``topics``, ``jsonvalue``, the MQTT wire format
(``mqtt_codec``) and the control-plane interface (``sink``).

Every upstream function below is pinned by the hash of its 0.12.1 source in ``tests/test_broker_scaling.py``
(an amqtt upgrade that changes one fails there until its copy is looked at again); that test also checks
this table and the pins name the same functions. Kinds: *copy* (the body is copied with changes),
*override* (a subclass method that calls or replaces upstream's), *relied on* (upstream code a copy depends on
behaving as it does), *re-implemented* (its job is done by fork code without calling it).

Upstream function (fork module, kind): what changed, and why.

* ``Broker.__init__`` (indexed, override): adds the per-client filter index, the router, the inline ACL
* ``Broker.start`` (indexed, override): starts with an empty router as amqtt empties its subscription table
* ``Broker.add_subscription`` (indexed, override): indexes the granted filter per client and in the router; broker counts denials
* ``Broker._del_subscription`` (indexed, override): keeps the index and router in step; drops filters nobody holds
* ``Broker._del_all_subscriptions`` (indexed, re-implemented): walks the client's own filters, not every filter of the fleet
* ``Broker._topic_filtering`` (indexed, override): evaluates the device ACL inline instead of a task per plugin call
* ``Broker._handle_message_delivery`` (indexed, copy): ``$`` topics without zombies; routes at once through the router
* ``Broker._run_broadcast`` (indexed, re-implemented): a publish goes to its matching filters' subscribers, no broadcast queue
* ``Broker._broadcast_message`` (indexed, copy): routes at once instead of queueing for the broadcast task
* ``Broker._matches`` (router, re-implemented): topic matching by an index of filters (``router.TopicRouter``)
* ``Broker._shutdown_broadcast_loop`` (indexed, override): also waits for the per-subscriber publish tasks
* ``Broker._handle_client_session`` (indexed, copy): retained messages for the client's own filters; no second authentication
* ``Broker._client_message_loop`` (indexed, copy): one task polling light queues instead of four tasks; no repr of the table
* ``Broker._create_server_instance`` (broker, copy): a listen backlog for fleet reconnects; a WebSocket max_size
* ``Broker._client_connected`` (broker, copy): connection caps, bounded reader, rate-limited logs, socket released at the end
* ``Broker._initialize_client_session`` (broker, copy): authenticates first, so a refused CONNECT cannot take over a session
* ``Broker._authenticate`` (broker, override): counts refusals (``auth_failures``); called once per CONNECT
* ``Broker._handle_disconnect`` (broker, override): a taken-over connection leaves the shared session alone; tells the sink
* ``Broker._handle_subscription`` (broker, override): tells the sink which filters were granted
* ``Broker._delete_session`` (broker, override): a clean-session take-over closes the old connection [MQTT-3.1.4-2]
* ``Session.__init__`` (session, override): light queues instead of ``asyncio.Queue`` per session (memory per device)
* ``Session._init_states`` (session, re-implemented): a two-field state instead of a ``transitions.Machine`` (memory per device)
* ``BrokerProtocolHandler.__init__`` (handler, override): fast-path state (pending acks, kept messages, the broker hooks)
* ``BrokerProtocolHandler.start`` (session, copy): no keep-alive task per connection; the reader enforces keep-alive
* ``BrokerProtocolHandler.init_from_connect`` (session, copy): the CONNECT read by ``limits.read_connect``
* ``BrokerProtocolHandler.handle_read_timeout`` (handler, override): the broker disconnects on keep-alive expiry (amqtt logs)
* ``ProtocolHandler.start`` (session, copy): two tasks per connection instead of six
* ``ProtocolHandler._init_session`` (session, override): light queues for the handler's pending operations
* ``ProtocolHandler.attach`` (handler, override): keeps the reader's ``readexactly`` for the fast reader
* ``ProtocolHandler._reader_loop`` (handler, copy): decodes PUBLISH/PUBACK/PINGREQ from bytes, validates, enforces keep-alive
* ``ProtocolHandler.mqtt_publish`` (handler, re-implemented): QoS 0/1 written at once, no task per message
* ``ProtocolHandler._handle_qos0_message_flow`` (handler, re-implemented): incoming QoS 0 handed to the broker from the reader
* ``ProtocolHandler._handle_qos1_message_flow`` (handler, copy): the PUBACK waits until what the publish changes is stored
* ``ProtocolHandler._handle_qos2_message_flow`` (handler, override): routed QoS 2 kept for redelivery [MQTT-4.4.0-1]
* ``ProtocolHandler._retry_deliveries`` (handler, copy): resends kept messages with their packet id and DUP [MQTT-4.4.0-1]
* ``ProtocolHandler._stop_waiters`` (handler, override): keeps un-acked routed messages before upstream fails their waiters
* ``ProtocolHandler.stop`` (handler, relied on): ``_stop_waiters`` must stay the first thing it does
* ``ProtocolHandler._send_packet`` (handler, re-implemented): encoded by ``mqtt_codec``, no lock per packet
* ``ProtocolHandler.handle_puback`` (handler, re-implemented): PUBACK decoded from bytes in the reader
* ``ProtocolHandler.handle_publish`` (handler, re-implemented): PUBLISH decoded from bytes in the reader
* ``MQTTFixedHeader.from_stream`` (handler, re-implemented): the fixed header read from bytes, its length bounded first
* ``MQTTPacket.from_stream`` (limits, re-implemented): the first packet's header checked before its body is read
* ``PublishVariableHeader.from_stream`` (handler, re-implemented): topic and packet id sliced from the body
* ``PublishPayload.from_stream`` (handler, re-implemented): the payload is the rest of the body (no second read)
* ``PluginManager.fire_event`` (indexed, relied on): skipped for events no plugin listens to
* ``StreamReaderAdapter.__init__`` (limits, override): a bounded TCP reader (packet size from the fixed header)
* ``StreamReaderAdapter.read`` (limits, override): refuses a packet above the limit before reading its body
* ``WebSocketsReader.__init__`` (limits, override): a bounded WebSocket reader over the same framing
* ``WebSocketsReader.read`` (limits, override): refuses a packet above the limit before buffering it
"""
