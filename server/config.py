"""Settings: one frozen dataclass, read from ``FLEETCMD_*`` variables and CLI flags at the edge."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from broker_hooks.topics import level_problem
from server.external_broker.url import BrokerUrlError, parse_broker_url
from server.store import STORES, url_scheme

ENV_PREFIX = "FLEETCMD_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The largest remaining length an MQTT fixed header can encode (four length bytes).
MQTT_MAX_PACKET = 268_435_455
LOG_FORMATS = ("text", "json")
MAX_RETENTION_DAYS = 36500
BROKER_SHARED = ("auto", "on", "off")
# MQTT 5's Session Expiry Interval is a four-byte integer (seconds).
MAX_SESSION_EXPIRY = 0xFFFFFFFF
MAX_OUTBOX_LEASE = 86_400
MAX_JOB_ADOPT = 3_600
# The broker's shared secret must be long enough not to be guessed (it guards every device's admission).
MIN_BROKER_AUTH_SECRET = 16


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Everything the service can be configured with.

    Each field ``name`` is read from ``FLEETCMD_<NAME>``; ``serve`` flags of the
    same name override the environment.
    """

    bind: str = field(default="127.0.0.1", metadata={"help": "address every listener binds to"})
    mqtt_port: int = field(default=1883, metadata={"help": "MQTT over TCP port (-1 = off, 0 = any free port)"})
    ws_port: int = field(default=-1, metadata={"help": "MQTT over WebSocket port (-1 = off, 0 = any free port)"})
    mqtts_port: int = field(default=-1, metadata={"help": "MQTT over TLS port (-1 = off, 0 = any free port)"})
    wss_port: int = field(default=-1, metadata={"help": "MQTT over secure WebSocket port (-1 = off, 0 = any free port)"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port (0 = any free port)"})
    grpc_tls: bool = field(default=False, metadata={"help": "serve gRPC with TLS (tls_cert_file, tls_key_file), not plaintext"})
    http_port: int = field(
        default=8080, metadata={"help": "HTTP port: REST API and Kaa HTTP polling (-1 = off, 0 = any free port)"}
    )
    http_tls: bool = field(default=False, metadata={"help": "serve HTTP with TLS (tls_cert_file, tls_key_file), not plaintext"})
    tls_cert_file: str = field(default="", metadata={"help": "PEM certificate chain for the TLS listeners"})
    tls_key_file: str = field(default="", metadata={"help": "PEM private key for the TLS listeners"})
    data_dir: Path = field(default=Path("data"), metadata={"help": "directory of the SQLite store"})
    database_url: str = field(default="", metadata={"help": "the store, as a URL (default: sqlite:///<data_dir>/fleetcmd.db)"})
    log_level: str = field(default="INFO", metadata={"help": "DEBUG, INFO, WARNING or ERROR"})
    log_format: str = field(default="text", metadata={"help": "text (one line per event) or json (one JSON object per line)"})
    retention_days: float = field(
        default=30.0, metadata={"help": "days finished executions and their events are kept (0 = forever; fractions allowed)"}
    )
    default_ttl: int = field(default=30, metadata={"help": "TTL in seconds when a Send gives 0"})
    max_ttl: int = field(default=86400, metadata={"help": "largest TTL a Send may ask for"})
    max_params_bytes: int = field(default=64 * 1024, metadata={"help": "largest params object, as JSON"})
    max_response_bytes: int = field(default=256 * 1024, metadata={"help": "largest device response payload"})
    max_active_executions: int = field(default=100_000, metadata={"help": "non-final executions held at once"})
    stream_buffer: int = field(default=1000, metadata={"help": "events buffered per Stream before it is ended"})
    ingest_queue: int = field(default=10_000, metadata={"help": "device reports waiting to be processed"})
    mqtt_backlog: int = field(default=4096, metadata={"help": "listen backlog of the MQTT listeners (connects not yet accepted)"})
    mqtt_connect_timeout: float = field(
        default=10.0, metadata={"help": "seconds a new MQTT connection has to send its CONNECT before it is closed"}
    )
    mqtt_max_packet_bytes: int = field(
        default=0,
        metadata={"help": "largest MQTT packet, checked before its body is read (0 = max_response_bytes + 64 KiB)"},
    )
    mqtt_max_connections: int = field(default=100_000, metadata={"help": "MQTT connections open at once, all listeners"})
    mqtt_max_connections_per_address: int = field(
        default=0, metadata={"help": "MQTT connections open at once from one IP address (0 = no cap: NAT)"}
    )
    shutdown_timeout: float = field(default=8.0, metadata={"help": "seconds a graceful stop may take"})
    sys_interval: int = field(default=0, metadata={"help": "$SYS broadcast interval in seconds (0 = off)"})
    # uvloop when installed (it is a dependency on Linux and macOS): alternating three times in one
    # run at 1,000 devices, ~13 % more end-to-end commands/s and ~15 % less event-loop CPU per
    # command than asyncio's loop (BENCHMARKS.md).
    event_loop: str = field(default="auto", metadata={"help": "asyncio, uvloop, or auto (uvloop when installed)"})
    allow_anonymous: bool = field(
        default=False,
        metadata={"help": "DEVELOPMENT ONLY: admit devices without credentials and Sends to unregistered things"},
    )

    broker_url: str = field(
        default="",
        repr=False,  # may carry a password
        metadata={
            "help": "external MQTT 5 broker, mqtt://[user:password@]host[:port] or mqtts://...: "
            "turns the embedded broker off (docs/external-broker.md)"
        },
    )
    broker_username: str = field(default="", metadata={"help": "username at the external broker (when broker_url has none)"})
    broker_password: str = field(
        default="", repr=False, metadata={"help": "password at the external broker (when broker_url has none)"}
    )
    broker_client_id: str = field(
        default="",
        metadata={"help": "client id at the external broker, stable per replica (default fleetcmd-<hostname>)"},
    )
    broker_shared: str = field(
        default="auto",
        metadata={"help": "shared subscriptions for device reports: on, off, or auto ($share for non-$ topics only)"},
    )
    broker_share_group: str = field(default="fleetcmd", metadata={"help": "the $share group of the replicas"})
    outbox_lease_seconds: int = field(
        default=30,
        metadata={"help": "replicas: seconds a replica holds an unacknowledged request before another may publish it"},
    )
    job_adopt_seconds: int = field(
        default=2,
        metadata={"help": "replicas: seconds between two looks for jobs whose replica stopped (lock free), to take them over"},
    )
    broker_session_expiry: int = field(
        default=3600,
        metadata={"help": "seconds the broker keeps the service's session (unacknowledged reports) while it is away"},
    )
    broker_ca_file: str = field(default="", metadata={"help": "PEM CA bundle for mqtts:// (default: the system's)"})
    broker_auth_secret: str = field(
        default="",
        repr=False,
        metadata={
            "help": "secret the broker sends in X-Fleetcmd-Broker-Secret to /api/v1/broker/authn and /authz "
            f"(empty = those endpoints are off; at least {MIN_BROKER_AUTH_SECRET} characters)"
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.grpc_port <= 65535:
            problems.append("grpc_port must be 0..65535")
        if not -1 <= self.http_port <= 65535:
            problems.append("http_port must be -1 (off) or 0..65535")
        mqtt_ports = ("mqtt_port", "ws_port", "mqtts_port", "wss_port")
        for name in mqtt_ports:
            if not -1 <= getattr(self, name) <= 65535:
                problems.append(f"{name} must be -1 (off) or 0..65535")
        problems.extend(self._broker_problems())
        if not self.broker_url and all(getattr(self, name) == -1 for name in mqtt_ports):
            problems.append("at least one of mqtt_port, ws_port, mqtts_port, wss_port must be on")
        problems.extend(self._tls_problems())
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            problems.append("event_loop must be auto, uvloop or asyncio")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        if not 0 <= self.retention_days <= MAX_RETENTION_DAYS:
            problems.append(f"retention_days must be 0 (keep forever) .. {MAX_RETENTION_DAYS}")
        if not 1 <= self.default_ttl <= self.max_ttl:
            problems.append("default_ttl must be between 1 and max_ttl")
        for name in ("max_params_bytes", "max_response_bytes", "max_active_executions", "stream_buffer", "ingest_queue"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive")
        if not 1 <= self.mqtt_backlog <= 65535:
            problems.append("mqtt_backlog must be 1..65535")
        if self.mqtt_connect_timeout <= 0:
            problems.append("mqtt_connect_timeout must be positive")
        if self.mqtt_max_packet_bytes != 0 and not self.max_response_bytes <= self.mqtt_max_packet_bytes <= MQTT_MAX_PACKET:
            problems.append(f"mqtt_max_packet_bytes must be 0 (auto) or max_response_bytes..{MQTT_MAX_PACKET}")
        if self.mqtt_max_connections < 1:
            problems.append("mqtt_max_connections must be positive")
        if self.mqtt_max_connections_per_address < 0:
            problems.append("mqtt_max_connections_per_address must be >= 0 (0 = no cap)")
        if self.shutdown_timeout <= 0:
            problems.append("shutdown_timeout must be positive")
        if self.sys_interval < 0:
            problems.append("sys_interval must be >= 0")
        if self.database_url and url_scheme(self.database_url) not in STORES:
            problems.append(f"database_url {self.database_url!r} names no known store (schemes: {', '.join(sorted(STORES))})")
        if problems:
            raise SettingsError("; ".join(problems))

    def _broker_problems(self) -> list[str]:
        problems = []
        if self.broker_url:
            try:
                parse_broker_url(self.broker_url)
            except BrokerUrlError as exc:
                problems.append(str(exc))
            if self.broker_ca_file and not os.access(self.broker_ca_file, os.R_OK):
                problems.append(f"broker_ca_file {self.broker_ca_file!r} is not a readable file")
        if self.broker_shared not in BROKER_SHARED:
            problems.append(f"broker_shared must be one of {', '.join(BROKER_SHARED)}")
        if level_problem(self.broker_share_group) is not None:
            problems.append(f"broker_share_group {level_problem(self.broker_share_group)}")
        if not 1 <= self.outbox_lease_seconds <= MAX_OUTBOX_LEASE:
            problems.append(f"outbox_lease_seconds must be 1..{MAX_OUTBOX_LEASE}")
        if not 1 <= self.job_adopt_seconds <= MAX_JOB_ADOPT:
            problems.append(f"job_adopt_seconds must be 1..{MAX_JOB_ADOPT}")
        if not 0 <= self.broker_session_expiry <= MAX_SESSION_EXPIRY:
            problems.append(f"broker_session_expiry must be 0..{MAX_SESSION_EXPIRY}")
        if self.broker_auth_secret and len(self.broker_auth_secret) < MIN_BROKER_AUTH_SECRET:
            problems.append(f"broker_auth_secret must be empty (off) or at least {MIN_BROKER_AUTH_SECRET} characters")
        return problems

    def _tls_problems(self) -> list[str]:
        wanted = [name for name in ("mqtts_port", "wss_port") if getattr(self, name) != -1]
        if self.grpc_tls:
            wanted.append("grpc_tls")
        if self.http_tls and self.http_port != -1:
            wanted.append("http_tls")
        if not wanted:
            return []
        problems = []
        for name in ("tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if not path:
                problems.append(f"{', '.join(wanted)} need {name}")
            elif not Path(path).is_file() or not os.access(path, os.R_OK):
                problems.append(f"{name} {path!r} is not a readable file")
        return problems

    @property
    def mqtt_packet_limit(self) -> int:
        """The largest MQTT packet admitted: ``mqtt_max_packet_bytes``, or room for a largest response and its topic."""
        if self.mqtt_max_packet_bytes:
            return self.mqtt_max_packet_bytes
        return min(self.max_response_bytes + 64 * 1024, MQTT_MAX_PACKET)

    @property
    def tls_enabled(self) -> bool:
        """Whether any listener (MQTT, gRPC or HTTP) uses TLS."""
        return self.mqtts_port != -1 or self.wss_port != -1 or self.grpc_tls or (self.http_tls and self.http_port != -1)

    @property
    def db_path(self) -> Path:
        """Path of the SQLite database file of the default store."""
        return self.data_dir / "fleetcmd.db"

    @property
    def store_url(self) -> str:
        """The store's URL: ``database_url``, else the SQLite file in ``data_dir``."""
        return self.database_url or default_database_url(self.data_dir)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``FLEETCMD_*`` variables, then apply non-None ``overrides``.

        Raises:
            SettingsError: a value does not parse or is out of range.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def default_database_url(data_dir: Path) -> str:
    """The store URL of the SQLite file in ``data_dir`` (``sqlite:////abs/path`` for an absolute one)."""
    return f"sqlite:///{data_dir.as_posix()}/fleetcmd.db"


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    default: object = f.default
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
    except ValueError as exc:
        raise SettingsError(f"{ENV_PREFIX}{f.name.upper()}={raw!r}: {exc}") from exc
    return raw
