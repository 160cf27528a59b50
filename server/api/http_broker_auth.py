"""EMQX's HTTP authenticator and authorizer, answered with the embedded broker's own rules.

In external broker mode the broker admits devices and enforces their topics. EMQX asks an HTTP
service (its "HTTP Server" authenticator and authorizer); these two endpoints answer in its format,
from the same things table and the same code the embedded broker runs:

* ``POST /api/v1/broker/authn`` with ``{"clientid", "username", "password"}`` (EMQX's body template,
  docs/external-broker.md): ``{"result": "allow"|"deny", "is_superuser": false}`` decided by
  :func:`broker_hooks.auth.admits` (a registered thing with client id = username = thing id and its
  current password; a Kaa device without credentials while Kaa endpoints exist). The service's own
  broker account (``broker_username``/``broker_password``) is allowed as a superuser: it subscribes
  to every report topic and publishes every request. Its username is reserved: with another
  password it is denied, never tried as a thing, so authz can trust it.
* ``POST /api/v1/broker/authz`` with ``{"clientid", "username", "action", "topic"}``: ``allow`` or
  ``deny`` from :class:`broker_hooks.acl.TopicAcl` (a thing's own dialect topics; Kaa topics by the
  endpoint token), exactly as the embedded broker's ACL plugin decides.

Both answer HTTP 200 with ``application/json`` (EMQX reads any other status as "ignore", which
would fall through to its next authenticator); they are served only when ``broker_auth_secret`` is
set, and every request must carry it in the ``X-Fleetcmd-Broker-Secret`` header (else 401, no
decision). A malformed body is answered 400 naming the field.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from amqtt.contexts import Action

from broker_hooks.acl import TopicAcl
from broker_hooks.auth import DeviceAuthenticator, admits
from server.api import http_rest
from server.core.errors import InvalidArgument

PREFIX = "/api/v1/broker/"
AUTHN_PATH = PREFIX + "authn"
AUTHZ_PATH = PREFIX + "authz"
SECRET_HEADER = "X-Fleetcmd-Broker-Secret"
# Longer than any client id, username, password or topic fleetcmd admits (topics: MQTT's 65535 bytes).
MAX_FIELD_LENGTH = 65535
ACTIONS = {"publish": Action.PUBLISH, "subscribe": Action.SUBSCRIBE}


def _allow(allowed: bool, *, superuser: bool = False) -> web.Response:
    return web.json_response({"result": "allow" if allowed else "deny", "is_superuser": superuser})


def _text(body: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    # EMQX renders an absent username or password as "" (or null when the template says so).
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument.single(name, "must be a string")
    if len(value) > MAX_FIELD_LENGTH:
        raise InvalidArgument.single(name, f"must be at most {MAX_FIELD_LENGTH} characters")
    return value


class BrokerAuth:
    """The authn and authz endpoints (see the module docstring).

    Args:
        authenticator: the registry (things and their credentials, Kaa endpoints).
        acl: the topic ACL the embedded broker would enforce (built from the same dialects).
        secret: the shared secret the broker sends in :data:`SECRET_HEADER`.
        service_account: the service's own (username, password) at the broker, or None.
        allow_anonymous: development mode, as for the embedded broker.
    """

    def __init__(
        self,
        authenticator: DeviceAuthenticator,
        acl: TopicAcl,
        secret: str,
        *,
        service_account: tuple[str, str] | None = None,
        allow_anonymous: bool = False,
    ) -> None:
        self._authenticator = authenticator
        self._acl = acl
        self._secret = secret.encode()
        self._service = service_account if service_account and service_account[0] else None
        self._allow_anonymous = allow_anonymous

    def routes(self) -> list[web.RouteDef]:
        """``POST`` authn and authz."""
        return [web.post(AUTHN_PATH, self.authn), web.post(AUTHZ_PATH, self.authz)]

    async def _body(self, request: web.Request) -> Mapping[str, Any]:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, self._secret):
            raise http_rest.HttpError(401, "UNAUTHENTICATED", f"the broker's shared secret is required ({SECRET_HEADER})")
        body = await http_rest.read_json(request)
        if not isinstance(body, dict):
            raise InvalidArgument.single("body", "must be a JSON object")
        return body

    def _is_service(self, username: str, password: str | None) -> bool:
        if self._service is None or username != self._service[0]:
            return False
        return password is None or hmac.compare_digest(password.encode(), self._service[1].encode())

    async def authn(self, request: web.Request) -> web.Response:
        """EMQX HTTP authentication: may this CONNECT in?"""
        body = await self._body(request)
        client_id = _text(body, "clientid")
        username = _text(body, "username", required=False)
        password = _text(body, "password", required=False)
        if self._service is not None and username == self._service[0]:
            # The service's username is the service's alone (never a thing's), so authz may trust it.
            return _allow(self._is_service(username, password), superuser=self._is_service(username, password))
        # No credentials at all reach the rule as the embedded broker sees them: no username, no password.
        allowed = admits(
            self._authenticator,
            client_id,
            username or None,
            password if (username or password) else None,
            allow_anonymous=self._allow_anonymous,
            remote=request.headers.get("X-Forwarded-For") or request.remote,
        )
        return _allow(allowed)

    async def authz(self, request: web.Request) -> web.Response:
        """EMQX HTTP authorization: may this client publish to / subscribe with this topic?"""
        body = await self._body(request)
        client_id = _text(body, "clientid")
        username = _text(body, "username", required=False)
        topic = _text(body, "topic")
        action = ACTIONS.get(_text(body, "action"))
        if action is None:
            raise InvalidArgument.single("action", f"must be one of {', '.join(ACTIONS)}")
        if self._is_service(username, None):
            # Only the service's account authenticated with that username (its password was checked at authn).
            return _allow(True)
        return _allow(self._acl.allows_client(client_id, bool(username), topic, action))
