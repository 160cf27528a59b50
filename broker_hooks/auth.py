"""Device authentication for the embedded broker.

Secure by default: a device connects with client id = username = its thing id
and password = its token, checked against the registry. Unknown things, wrong
tokens and anonymous clients get CONNACK "not authorized" (rc 5).

Kaa endpoints are the exception: in Kaa the endpoint token in the topic is the
device's credential and firmware connects without MQTT credentials (the seed's
client uses a random client id and no username). So a CONNECT with *no*
credentials at all (no username, no password) is admitted while at least one
Kaa endpoint is registered, unless its client id is a registered thing's id
(that would let it take over the thing's connection). Such a client gets no
identity: the ACL (``acl.py``) confines it to the ``kp1/{av}/cex|dcx/{token}/...``
topics of registered endpoints, so it can do nothing without a valid token.
With no Kaa endpoint registered, no-credential CONNECTs are refused as before.
A CONNECT that presents credentials must present valid ones.

amqtt refuses every CONNECT when no auth plugin is configured, and its
``AnonymousAuthPlugin`` marks every session anonymous, which turns off
persistent sessions. In development mode (``allow_anonymous``)
:class:`DeviceAuthPlugin` admits every client *without* marking the session
anonymous, so ``clean_session = false`` devices keep their queued messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

log = logging.getLogger(__name__)


class DeviceAuthenticator(Protocol):
    """What the plugin needs from the registry."""

    def authenticate_device(self, client_id: str, username: str | None, password: str | None) -> bool:
        """Whether the CONNECT is from a registered thing with its current password."""

    def is_registered(self, thing_id: str) -> bool:
        """Whether ``thing_id`` is a registered thing."""

    def has_kaa_endpoints(self) -> bool:
        """Whether any Kaa endpoint is registered (then devices may connect without credentials)."""


def refusal_reason(authenticator: DeviceAuthenticator, client_id: str, username: str | None, password: str | None) -> str:
    """Why a CONNECT was refused, for the log (never includes the password)."""
    if not username and password is None:
        if authenticator.is_registered(client_id):
            return "no credentials, with a registered thing's client id"
        return "no credentials (and no Kaa endpoint is registered)"
    if username != client_id:
        return "username is not the client id"
    if not authenticator.is_registered(client_id):
        return "unknown thing"
    if password is None:
        return "no password"
    return "wrong password"


class DeviceAuthPlugin(BaseAuthPlugin):
    """Admit registered things with their current token; everyone, when ``allow_anonymous``."""

    @dataclass
    class Config:
        """``authenticator``: the registry (passed as an object); ``allow_anonymous``: development mode."""

        authenticator: Any = None
        allow_anonymous: bool = False

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.allow_anonymous: bool = bool(self.config.allow_anonymous)
        self.authenticator: DeviceAuthenticator | None = self.config.authenticator
        if self.authenticator is None and not self.allow_anonymous:
            raise TypeError("DeviceAuthPlugin needs an 'authenticator' unless 'allow_anonymous' is set")

    async def authenticate(self, *, session: Session) -> bool:
        """True for a registered thing with its token (or anyone in development mode); always a bool."""
        return self.check(session.client_id or "", session.username, session.password, session.remote_address)

    def check(self, client_id: str, username: str | None, password: str | None, remote: str | None = None) -> bool:
        """The synchronous decision (also used to measure the cost of authentication)."""
        return admits(self.authenticator, client_id, username, password, allow_anonymous=self.allow_anonymous, remote=remote)


def admits(
    authenticator: DeviceAuthenticator | None,
    client_id: str,
    username: str | None,
    password: str | None,
    *,
    allow_anonymous: bool,
    remote: str | None = None,
) -> bool:
    """Whether a CONNECT is admitted (the plugin's rule, also answered to an external broker's authn)."""
    if allow_anonymous:
        # Never set session.is_anonymous: amqtt would drop persistent sessions and their queues.
        return True
    assert authenticator is not None
    if authenticator.authenticate_device(client_id, username, password):
        return True
    if not username and password is None and authenticator.has_kaa_endpoints() and not authenticator.is_registered(client_id):
        return True  # a Kaa device: its credential is the endpoint token in its topics (see the ACL)
    log.info(
        "device refused: client_id=%r username=%r from %s: %s",
        client_id,
        username,
        remote or "?",
        refusal_reason(authenticator, client_id, username, password),
    )
    return False
