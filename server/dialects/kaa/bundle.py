"""The Kaa CEX bundle: everything the Kaa dialect brings, in one object.

KP1 topics and their decoders, the endpoint-token ACL, the push route, the request handlers,
HTTP polling under ``/kp1/`` and the store's Kaa queries (:class:`KaaStore`).
"""

from __future__ import annotations

from collections.abc import Sequence

from broker_hooks.acl import ScopedAcl
from server.api.http_app import DeviceHttp
from server.core.registry import Registry
from server.dialects.bundle import DialectBundle, DialectContext, DialectRuntime
from server.dialects.kaa import http, topics
from server.dialects.kaa.cex import KaaMqtt
from server.store import KaaStore


def scoped_acls(registry: Registry) -> Sequence[ScopedAcl]:
    """Kaa topics are scoped by the endpoint token in them, checked against the registry."""
    return [topics.KaaAcl(registry)]


def attach(ctx: DialectContext) -> DialectRuntime:
    """The Kaa runtime: routes to registered Kaa endpoints, handles KP1 requests, serves HTTP polling."""
    mqtt = KaaMqtt(ctx.core, ctx.link, ctx.spawn)
    routes = http.KaaHttp(mqtt.cex, ctx.core.settings.max_response_bytes).routes()
    return DialectRuntime(
        route=mqtt.route,
        claims=ctx.core.registry.is_kaa_endpoint,
        handlers=mqtt.handlers(),
        listeners=(mqtt,),
        http=DeviceHttp(http.PREFIX, routes, http.error_response),
        # Every client that used the thing's endpoint token.
        clients=mqtt.route.clients,
        state=mqtt,
    )


BUNDLE = DialectBundle(name="kaa", wire=topics.DIALECT, attach=attach, scoped_acls=scoped_acls, store_needs=(KaaStore,))
