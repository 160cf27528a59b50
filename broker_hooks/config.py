"""Build the amqtt configuration for the embedded broker: listeners (plain and TLS) and plugins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType

# Listener names, in the order the first enabled one becomes amqtt's required "default".
MQTT, WS, MQTTS, WSS = "mqtt", "ws", "mqtts", "wss"
LISTENERS = (MQTT, WS, MQTTS, WSS)


@dataclass
class ExplicitListenerConfig(ListenerConfig):
    """A listener that is exactly what it says.

    amqtt copies every field a non-default listener leaves at its dataclass default from the
    ``default`` listener (``ListenerConfig.apply``), so a plain WebSocket listener next to a TLS
    ``default`` would silently become TLS, and a plain TCP listener next to a WebSocket ``default``
    would become a WebSocket listener: setting a field explicitly to its default value is not
    enough. fleetcmd sets every field of every listener, so nothing is inherited.
    """

    def apply(self, other: ListenerConfig) -> None:
        """Inherit nothing."""


def listener_specs(
    *,
    bind: str,
    mqtt_port: int,
    ws_port: int,
    mqtts_port: int = -1,
    wss_port: int = -1,
    tls_cert_file: str = "",
    tls_key_file: str = "",
) -> dict[str, dict[str, Any]]:
    """The enabled listeners by fleetcmd name (``mqtt``, ``ws``, ``mqtts``, ``wss``), every field set.

    A port of -1 switches a listener off; 0 binds any free port.
    """
    ports = {MQTT: mqtt_port, WS: ws_port, MQTTS: mqtts_port, WSS: wss_port}
    specs: dict[str, dict[str, Any]] = {}
    for name in LISTENERS:
        port = ports[name]
        if port < 0:
            continue
        tls = name in (MQTTS, WSS)
        if tls and not (tls_cert_file and tls_key_file):
            raise ValueError(f"listener {name} needs a TLS certificate and key file")
        specs[name] = {
            "type": ListenerType.WS if name in (WS, WSS) else ListenerType.TCP,
            "bind": f"{bind}:{port}",
            "max_connections": 0,
            "ssl": tls,
            "cafile": None,
            "capath": None,
            "cadata": None,
            "certfile": Path(tls_cert_file) if tls else None,
            "keyfile": Path(tls_key_file) if tls else None,
            "reader": None,
            "writer": None,
        }
    if not specs:
        raise ValueError("at least one MQTT listener (mqtt, ws, mqtts or wss) must be enabled")
    return specs


def amqtt_listener_names(names: list[str]) -> dict[str, str]:
    """Map fleetcmd listener names to amqtt names: the first enabled one is amqtt's ``default``."""
    return {name: ("default" if i == 0 else name) for i, name in enumerate(names)}


def broker_config(
    *,
    bind: str,
    mqtt_port: int,
    ws_port: int,
    sys_interval: int,
    mqtts_port: int = -1,
    wss_port: int = -1,
    tls_cert_file: str = "",
    tls_key_file: str = "",
    authenticator: Any = None,
    allow_anonymous: bool = False,
    acl: Any = None,
) -> BrokerConfig:
    """Amqtt ``BrokerConfig``: explicit listeners and an explicit, minimal plugin set.

    Args:
        bind: Address every listener binds to.
        mqtt_port: MQTT over TCP port (0 = any free port, -1 = off).
        ws_port: MQTT over WebSocket port (-1 = off).
        sys_interval: ``$SYS`` broadcast interval in seconds, 0 for none.
        mqtts_port: MQTT over TLS port (-1 = off).
        wss_port: MQTT over secure WebSocket port (-1 = off).
        tls_cert_file: PEM certificate chain of the TLS listeners.
        tls_key_file: PEM private key of the TLS listeners.
        authenticator: The registry (``authenticate_device``, ``is_registered``) for ``DeviceAuthPlugin``.
        allow_anonymous: Development mode: admit every client.
        acl: The ``TopicAcl`` for ``DeviceAclPlugin``; None for no topic ACL.

    Raises:
        ValueError: no listener enabled, or a TLS listener without certificate and key.
        FileNotFoundError: a certificate or key file does not exist.
    """
    specs = listener_specs(
        bind=bind,
        mqtt_port=mqtt_port,
        ws_port=ws_port,
        mqtts_port=mqtts_port,
        wss_port=wss_port,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
    )
    names = amqtt_listener_names(list(specs))
    listeners: dict[str, ListenerConfig] = {names[name]: ExplicitListenerConfig(**spec) for name, spec in specs.items()}
    # Listing plugins replaces amqtt's defaults (event/packet loggers, anonymous auth, $SYS).
    plugins: dict[str, Any] = {
        "broker_hooks.auth.DeviceAuthPlugin": {"authenticator": authenticator, "allow_anonymous": allow_anonymous},
    }
    if acl is not None:
        plugins["broker_hooks.acl.DeviceAclPlugin"] = {"acl": acl}
    if sys_interval > 0:
        plugins["amqtt.plugins.sys.broker.BrokerSysPlugin"] = {"sys_interval": sys_interval}
    return BrokerConfig(
        listeners=listeners,
        plugins=plugins,
        # Persistent sessions (and amqtt's unbounded per-session queues) of devices gone for a day are
        # dropped; fleetcmd's own outbox still delivers their commands when they come back.
        session_expiry_interval=86400,
    )
