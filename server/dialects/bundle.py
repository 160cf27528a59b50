"""The bundle type: everything one device dialect brings, in one object.

A dialect (EMQX commands, Kaa CEX, ...) is a :class:`DialectBundle`, registered in
``server.dialects.DIALECTS``. The app iterates that list and never names a dialect:

* ``wire`` (a :class:`broker_hooks.rules.Dialect`): its topic rules with their decoders, the
  device topics it grants (publish and subscribe, scoped by the client id) and its ``$`` prefixes;
* ``scoped_acls(registry)``: ACLs whose credential is in the topic (Kaa's endpoint token);
* ``store_needs``: store extensions it queries (checked once at startup, with a clear error);
* ``attach(ctx)``: builds its runtime against the core and the broker link, a :class:`DialectRuntime`
  holding its outbound route (and which things it claims), its handlers of lifecycle actions, its
  client listeners, its HTTP routes and the other clients that act for a thing.

A decoder that produces :class:`server.core.models.ExecutionReport` under
``LifecycleAction.DEVICE_REPORT`` is applied by the core's own fast path (no handler, no task per
report), whatever its dialect.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from broker_hooks.acl import ScopedAcl
from broker_hooks.rules import Dialect
from server.api.http_app import DeviceHttp
from server.core.commands import CommandCore, DeviceListener, InboundHandler
from server.core.delivery import DeviceLink, Route, Spawn
from server.core.errors import FleetcmdError
from server.core.registry import Registry


@dataclass(frozen=True)
class DialectContext:
    """What a dialect's runtime is built against."""

    core: CommandCore
    link: DeviceLink
    spawn: Spawn


def _no_clients(_thing_id: str) -> Iterable[str]:
    return ()


@dataclass(frozen=True)
class DialectRuntime:
    """A dialect attached to a running core.

    ``claims`` None makes ``route`` the default one (the route of every thing no other dialect
    claims; at most one dialect may be the default). ``clients(thing)`` names the clients, besides
    the thing's own, that act for it (a deleted thing's are disconnected). ``state`` is the dialect's
    own runtime object (for its tests and tools).
    """

    route: Route | None = None
    claims: Callable[[str], bool] | None = None
    handlers: Mapping[enum.Enum, InboundHandler] = field(default_factory=dict)
    listeners: Sequence[DeviceListener] = ()
    http: DeviceHttp | None = None
    clients: Callable[[str], Iterable[str]] = _no_clients
    state: object = None


def _no_acls(_registry: Registry) -> Sequence[ScopedAcl]:
    return ()


def _nothing(_ctx: DialectContext) -> DialectRuntime:
    return DialectRuntime()


@dataclass(frozen=True)
class DialectBundle:
    """One device dialect: its wire rules, ACLs, store needs and runtime (see the module docstring)."""

    name: str
    wire: Dialect
    attach: Callable[[DialectContext], DialectRuntime] = _nothing
    scoped_acls: Callable[[Registry], Sequence[ScopedAcl]] = _no_acls
    store_needs: tuple[type, ...] = ()

    def check_store(self, store: object) -> None:
        """Refuse a store that lacks an extension this dialect queries.

        Raises:
            FleetcmdError: naming the dialect, the store and the missing extension.
        """
        for need in self.store_needs:
            if not isinstance(store, need):
                raise FleetcmdError(
                    f"dialect {self.name} needs a store implementing {need.__name__}; {type(store).__name__} does not"
                )


def install(core: CommandCore, runtime: DialectRuntime) -> None:
    """Register a runtime's route, handlers and listeners with the core."""
    if runtime.route is not None:
        core.add_route(runtime.route, runtime.claims)
    for action, handler in runtime.handlers.items():
        if action in core.handlers:
            raise ValueError(f"two dialects handle {action}")
        core.handlers[action] = handler
    core.device_listeners.extend(runtime.listeners)
