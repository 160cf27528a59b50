"""The broker fleetcmd embeds, by its public names.

:class:`FleetBroker` (amqtt 0.12.1's ``Broker``, subclassed) lives in the fork package
:mod:`broker_hooks.amqtt_fork`, whose header lists every amqtt function it copies or overrides
and why; :class:`DeviceSink` and :class:`Delivery`, the interface to the control plane, are
fleetcmd's own (:mod:`broker_hooks.sink`). Callers import all three from here.
"""

from __future__ import annotations

from broker_hooks.amqtt_fork.broker import FleetBroker
from broker_hooks.sink import Delivery, DeviceSink

__all__ = ["Delivery", "DeviceSink", "FleetBroker"]
