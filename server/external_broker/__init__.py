"""External broker mode: the service as an MQTT 5 client of a broker it does not run (EMQX, mosquitto).

``FLEETCMD_BROKER_URL`` turns the embedded broker off; :mod:`server.app` then composes
:class:`~server.external_broker.link.ExternalBroker` in its place. Modules:

* ``url.py``: the broker URL, parsed once at the edge (imported by ``server.config``; no MQTT library);
* ``link.py``: the paho-mqtt client: the outbox's ``DeviceLink`` (requests at QoS 1 with a message
  expiry), the subscriptions to every dialect's report topics (shared or plain), and the ingest of
  reports into the core, each acknowledged only after its commit;
* ``events.py``: EMQX's event messages (presence, the device's PUBACK), decoded strictly.

It names no dialect (the app hands it the dialects' rules) and, like the embedded broker, talks to
the core only through :class:`broker_hooks.sink.DeviceSink` and the outbox's ``DeviceLink``.
"""
