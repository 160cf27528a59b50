"""The HTTP server: one aiohttp application in the service's event loop.

It serves the REST API for operators (``/api/v1/...``: commands :mod:`server.api.http_rest`,
things and types :mod:`server.api.http_registry`, events :mod:`server.api.http_events`),
its OpenAPI document (``/api/v1/openapi.json``, no key needed), the operator console at ``/``
(:mod:`server.api.http_console`) and the device
dialects' routes (:class:`DeviceHttp`; Kaa KP1 polling under ``/kp1/``,
:mod:`server.dialects.kaa.http`). Every failure is answered with JSON: a dialect's
own error body under its prefix (KP1's ``{"statusCode", "reasonPhrase"}``),
``{"code", "message", "details"}`` everywhere else. Request bodies are bounded
(:func:`body_limit`; larger ones get 413).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from server import __version__
from server.api import http_console, http_events, http_jobs, http_registry, http_rest, openapi
from server.core import metrics
from server.core.apikeys import ApiKeys
from server.core.authz import Operation, required_role
from server.core.commands import CommandCore
from server.core.errors import FleetcmdError
from server.core.job_runner import JobsCore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
OPENAPI_PATH = "/api/v1/openapi.json"
METRICS_PATH = "/metrics"
HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Every operator route (commands, registry, events), each naming its operation.
# The longest request line (method, path and query) the HTTP parser takes: a list filtered by many
# attributes needs more than aiohttp's 8 KiB. Longer lines are refused by the parser itself, before
# any handler, with a plain-text 400 (documented in docs/rest.md).
MAX_REQUEST_LINE = 64 * 1024
REST_ROUTES = http_rest.ROUTES + http_registry.ROUTES + http_events.ROUTES + http_console.ROUTES + http_jobs.ROUTES
# What is not ready, by part; empty when the service is ready (FleetcmdApp.readiness).
Readiness = Callable[[], Awaitable[dict[str, str]]]


def body_limit(max_params_bytes: int) -> int:
    """Largest request body: 1 MiB, or more when params may be larger (JSON escaping can double them)."""
    return max(MAX_BODY_BYTES, 2 * max_params_bytes + 64 * 1024)


@dataclass(frozen=True)
class DeviceHttp:
    """A device dialect's HTTP routes: every path starts with ``prefix``, and its failures are ``render_error``'s."""

    prefix: str
    routes: Sequence[web.RouteDef]
    render_error: Callable[[BaseException], web.Response]


DEVICE_HTTP = web.AppKey("device_http", tuple[DeviceHttp, ...])


def _render(request: web.Request, exc: BaseException) -> web.Response:
    for device in request.app[DEVICE_HTTP]:
        if request.path.startswith(device.prefix):
            return device.render_error(exc)
    return http_rest.error_response(exc)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure (domain error, refusal, aiohttp's 404/405/413, a bug) into a JSON answer."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _render(request, exc)
    except (FleetcmdError, http_rest.HttpError) as exc:
        log.debug("%s %s refused: %s", request.method, request.path, exc)
        return _render(request, exc)
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return _render(request, exc)


def request_timer(service_metrics: metrics.ServiceMetrics) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Middleware observing each request's duration by method, route (its pattern, not the path) and status."""
    histogram = service_metrics.http_duration

    @web.middleware
    async def timed(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            # The route's pattern keeps the label set bounded (paths carry ids); no route: "unmatched".
            route = request.match_info.route.resource
            name = route.canonical if route is not None else "unmatched"
            histogram.labels(request.method, name, str(status)).observe(time.perf_counter() - started)

    return timed


def build_app(
    core: CommandCore,
    keys: ApiKeys,
    devices: Sequence[DeviceHttp] = (),
    service_metrics: metrics.ServiceMetrics | None = None,
    ready: Readiness | None = None,
    jobs: JobsCore | None = None,
) -> web.Application:
    """The aiohttp application with every route.

    ``/metrics`` only with ``service_metrics``, ``/readyz`` with ``ready``, ``/api/v1/jobs`` with ``jobs``.
    """
    middlewares: list[Any] = [errors_as_json]
    if service_metrics is not None:
        middlewares.insert(0, request_timer(service_metrics))
    app = web.Application(client_max_size=body_limit(core.settings.max_params_bytes), middlewares=middlewares)
    app[DEVICE_HTTP] = tuple(devices)
    document = openapi.document(__version__)
    document["paths"].update(http_console.openapi_paths())

    async def get_openapi(request: web.Request) -> web.Response:
        return web.json_response(document)

    async def get_healthz(request: web.Request) -> web.Response:
        # The process runs its event loop: that is all liveness means (no dependency is checked).
        return web.json_response({"status": "ok"})

    app.router.add_get(OPENAPI_PATH, get_openapi)
    app.router.add_get(HEALTHZ_PATH, get_healthz)
    if ready is not None:

        async def get_readyz(request: web.Request) -> web.Response:
            failing = await ready()
            if failing:
                return web.json_response({"status": "unavailable", "failing": failing}, status=503)
            return web.json_response({"status": "ok"})

        app.router.add_get(READYZ_PATH, get_readyz)
    if service_metrics is not None:
        app.router.add_get(METRICS_PATH, _metrics_handler(keys, service_metrics))
    rest = http_rest.RestApi(core, keys)
    app.router.add_routes(rest.routes())
    app.on_shutdown.append(rest.on_shutdown)
    app.router.add_routes(http_registry.RegistryRest(core.registry, core.settings, keys).routes())
    events = http_events.EventsRest(core, keys)
    app.router.add_routes(events.routes())
    app.on_shutdown.append(events.on_shutdown)
    app.router.add_routes(http_console.Console(keys).routes())
    if jobs is not None:
        app.router.add_routes(http_jobs.JobsRestApi(jobs, keys).routes())
    for device in devices:
        app.router.add_routes(device.routes)
    return app


def _metrics_handler(keys: ApiKeys, service_metrics: metrics.ServiceMetrics) -> Handler:
    async def get_metrics(request: web.Request) -> web.Response:
        # Counters say how the fleet behaves (client counts, refusals): any API key may read them;
        # a key too weak for them (none today) is answered as no key at all.
        token = http_rest.bearer_token(request)
        principal = await keys.authenticate(token) if token else None
        if principal is None or principal.role < required_role(Operation.READ_METRICS):
            raise http_rest.HttpError(
                401,
                "UNAUTHENTICATED",
                "a valid API key is required (Authorization: Bearer ...)",
                {"WWW-Authenticate": 'Bearer realm="fleetcmd"'},
            )
        return web.Response(body=service_metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})

    return get_metrics


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A TLS server context from PEM files (blocking: reads the files)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


class HttpServer:
    """Start and stop the HTTP listener."""

    def __init__(
        self,
        core: CommandCore,
        keys: ApiKeys,
        devices: Sequence[DeviceHttp] = (),
        *,
        metrics: metrics.ServiceMetrics | None = None,
        ready: Readiness | None = None,
        shutdown_timeout: float = 2.0,
        jobs: JobsCore | None = None,
    ) -> None:
        self.app = build_app(core, keys, devices, metrics, ready, jobs)
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    async def start(self, bind: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen and serve; returns the bound port (also when ``port`` is 0)."""
        access_log = log if log.isEnabledFor(logging.DEBUG) else None
        runner = web.AppRunner(
            self.app, access_log=access_log, shutdown_timeout=self._shutdown_timeout, max_line_size=MAX_REQUEST_LINE
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, bind, port, ssl_context=ssl_context, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise
        addresses: list[Any] = runner.addresses
        if not addresses:  # pragma: no cover - a started TCPSite has a socket
            raise OSError(f"cannot bind HTTP to {bind}:{port}")
        return int(addresses[0][1])

    async def stop(self) -> None:
        """Stop listening; requests in flight (waiting Sends) get ``shutdown_timeout`` seconds, then are cancelled."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
