"""Where the external broker is: ``FLEETCMD_BROKER_URL`` parsed once, at the edge."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SCHEMES = {"mqtt": 1883, "mqtts": 8883}


class BrokerUrlError(ValueError):
    """A broker URL that cannot be used (the message says why, never with its password)."""


@dataclass(frozen=True)
class BrokerTarget:
    """An external MQTT broker: address, TLS, and the credentials the URL carries (empty when none)."""

    host: str
    port: int
    tls: bool
    username: str = ""
    password: str = ""

    def __str__(self) -> str:
        # For logs and the ready line: never the credentials.
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerTarget:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (default ports 1883 and 8883).

    Raises:
        BrokerUrlError: another scheme, no host, a bad port, or a path, query or fragment.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BrokerUrlError(f"broker_url: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise BrokerUrlError(f"broker_url must start with mqtt:// or mqtts:// (got {scheme or 'no'} scheme)")
    if not parts.hostname:
        raise BrokerUrlError("broker_url names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerUrlError("broker_url must be mqtt[s]://host[:port] with nothing after the port")
    if port == 0:
        raise BrokerUrlError("broker_url's port must be 1..65535")
    return BrokerTarget(
        host=parts.hostname,
        port=port or SCHEMES[scheme],
        tls=scheme == "mqtts",
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )
