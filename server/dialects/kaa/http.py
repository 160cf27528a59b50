"""Kaa CEX over HTTP (KP1 for devices that can only poll).

``POST /kp1/{appVersion}/cex/{token}/command/{type}`` with ``{}`` (or
``{"observe": ...}``, meaningless over HTTP and ignored) answers 200 with every
outstanding command of that type, ``[{"id", "payload"}]``; handing a command out
makes it SENT. ``POST /kp1/{appVersion}/cex/{token}/result/{type}`` with an array
(or a single object) of ``{"id", "statusCode", "reasonPhrase", "payload"}``
answers 200 (``{}``) when every item was applied (an empty array is a no-op),
else 400 naming the bad items, 404 when all of them name unknown commands (the
valid ones still count). Errors are KP1's ``{"statusCode", "reasonPhrase"}``
with the same HTTP status. The endpoint token in the path is the credential: no
API key.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from broker_hooks import jsonvalue
from server.api.http_rest import http_status, parse_json
from server.core.errors import FleetcmdError
from server.dialects.kaa.cex import MAX_ERROR_PHRASE, KaaCex, KaaError

PREFIX = "/kp1/"  # every failure below it is rendered by error_response
KP1 = "/kp1/{appVersion}/cex/{token}"


def error_response(exc: BaseException) -> web.Response:
    """Render any failure of a KP1 request as ``{"statusCode", "reasonPhrase"}`` with that HTTP status."""
    if isinstance(exc, KaaError):
        status, phrase = exc.status_code, exc.reason_phrase
    elif isinstance(exc, FleetcmdError):
        status, phrase = http_status(exc)[0], str(exc)
    elif isinstance(exc, web.HTTPException):
        status = exc.status
        phrase = exc.text if exc.text and not exc.text.startswith(f"{status}:") else exc.reason
    else:
        status, phrase = 500, "internal error"
    if not 400 <= status <= 599:
        status = 400
    headers = {}
    if isinstance(exc, web.HTTPMethodNotAllowed) and "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]  # a 405 names the methods that are allowed (RFC 9110)
    return web.json_response({"statusCode": status, "reasonPhrase": phrase}, status=status, headers=headers)


async def _body(cex: KaaCex, request: web.Request, limit: int | None = None) -> Any:
    raw = await request.read()
    if limit is not None and len(raw) > limit:
        raise KaaError(413, f"the request body is {len(raw)} bytes; the limit is {limit}")
    if not raw.strip():
        return None
    try:
        # An array of result objects: each item's "payload" is two levels down (bounded again per item).
        return parse_json(raw, jsonvalue.MAX_DEPTH + 2)
    except jsonvalue.JsonProblem as exc:
        cex.refused(exc.reason)
        raise KaaError(400, f"the request body is refused ({exc.reason}): {exc}"[:MAX_ERROR_PHRASE]) from None


class KaaHttp:
    """The KP1 command and result resources over HTTP."""

    def __init__(self, cex: KaaCex, max_result_bytes: int) -> None:
        self._cex = cex
        self._max_result_bytes = max_result_bytes

    def routes(self) -> list[web.RouteDef]:
        """The KP1 routes."""
        return [
            web.post(KP1 + "/command/{commandType}", self.command),
            web.post(KP1 + "/result/{commandType}", self.result),
        ]

    async def command(self, request: web.Request) -> web.Response:
        """Poll: every outstanding command of the type."""
        thing = self._cex.endpoint(request.match_info["appVersion"], request.match_info["token"])
        body = await _body(self._cex, request)
        if body is None:
            body = {}  # curl without --data: treat as {}
        if not isinstance(body, dict):
            raise KaaError(400, 'the request body must be a JSON object, e.g. {} or {"observe": false}')
        if "observe" in body and not isinstance(body["observe"], bool):
            raise KaaError(400, "observe must be true or false")
        commands = await self._cex.outstanding(thing, request.match_info["commandType"])
        return web.json_response(commands)

    async def result(self, request: web.Request) -> web.Response:
        """Report results; 400 naming every bad item (the good ones are applied)."""
        thing = self._cex.endpoint(request.match_info["appVersion"], request.match_info["token"])
        body = await _body(self._cex, request, self._max_result_bytes)
        outcomes = await self._cex.report(thing, request.match_info["commandType"], body)
        bad = [
            f"item {index}" + (f" (id {outcome.id})" if outcome.id is not None else "") + f": {outcome.error}"
            for index, outcome in enumerate(outcomes)
            if outcome.error is not None
        ]
        if bad:
            applied = len(outcomes) - len(bad)
            phrase = f"{len(bad)} of {len(outcomes)} results refused ({applied} applied): " + "; ".join(bad)
            # As over MQTT: 404 when every refused item names an unknown command, else 400.
            code = 404 if all(o.status_code == 404 for o in outcomes if o.error is not None) else 400
            raise KaaError(code, phrase[:MAX_ERROR_PHRASE])
        return web.json_response({})
