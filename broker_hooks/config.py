"""Build the amqtt configuration dictionary for the embedded broker."""

from __future__ import annotations

from typing import Any


def broker_config(*, bind: str, mqtt_port: int, ws_port: int, sys_interval: int) -> dict[str, Any]:
    """Amqtt ``BrokerConfig`` as a dict: explicit listeners and an explicit, minimal plugin set.

    Args:
        bind: Address every listener binds to.
        mqtt_port: TCP port (0 = any free port).
        ws_port: WebSocket port, -1 for no WebSocket listener.
        sys_interval: ``$SYS`` broadcast interval in seconds, 0 for none.
    """
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{bind}:{mqtt_port}"}}
    if ws_port >= 0:
        listeners["ws"] = {"type": "ws", "bind": f"{bind}:{ws_port}"}
    # Listing plugins replaces amqtt's defaults (event/packet loggers, anonymous auth, $SYS).
    plugins: dict[str, Any] = {"broker_hooks.auth.OpenAuthPlugin": {}}
    if sys_interval > 0:
        plugins["amqtt.plugins.sys.broker.BrokerSysPlugin"] = {"sys_interval": sys_interval}
    return {
        "listeners": listeners,
        "plugins": plugins,
        # Persistent sessions (and amqtt's unbounded per-session queues) of devices gone for a day are
        # dropped; fleetcmd's own outbox still delivers their commands when they come back.
        "session_expiry_interval": 86400,
    }
