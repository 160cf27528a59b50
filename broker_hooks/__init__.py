"""Everything that runs inside the embedded amqtt broker.

``broker`` names the :class:`~broker_hooks.broker.FleetBroker` that fixes amqtt 0.12.1's defects
(it and every other amqtt-derived piece live in ``amqtt_fork``, whose header lists what was copied and
why) and routes device publishes through a rule engine (``rules``); ``emqx`` is the first rule set
(topic dialect); ``mqtt_codec`` is the MQTT 3.1.1 wire format.
"""
