"""The one exception hierarchy of fleetcmd.

Every domain error derives from :class:`FleetcmdError`; the gRPC surface maps
them to status codes in one place (``server.api.grpc_errors``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field (mirrors ``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


class FleetcmdError(Exception):
    """Root of every error fleetcmd raises on purpose."""


class InvalidArgument(FleetcmdError):
    """The request is malformed; ``violations`` names each bad field."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        """Build the error for one bad field."""
        return cls([FieldViolation(field, description)])


class NotFound(FleetcmdError):
    """The named object does not exist."""


class AlreadyExists(FleetcmdError):
    """An object with that key exists and differs from the request."""


class FailedPrecondition(FleetcmdError):
    """The object is in a state that does not allow the operation."""


class ResourceExhausted(FleetcmdError):
    """A bounded resource (queue, active executions, stream buffer) is full."""


class Unavailable(FleetcmdError):
    """The service is shutting down or a dependency is not ready."""


class ThingMismatch(FleetcmdError):
    """A device report names another thing than the execution's."""


class ListenError(Unavailable):
    """A listener could not bind its port; names the setting that chose it, so the operator knows what to change."""

    def __init__(self, address: str, setting: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address} ({setting}): {reason}")
