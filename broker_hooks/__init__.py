"""Everything that runs inside the embedded amqtt broker.

``broker`` holds the :class:`~broker_hooks.broker.FleetBroker` subclass that fixes
amqtt 0.12.1's defects and routes device publishes through a rule engine
(``rules``); ``emqx`` is the first rule set (topic dialect).
"""
