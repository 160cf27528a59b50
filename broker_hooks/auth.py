"""Authentication plugin for the embedded broker.

amqtt refuses every CONNECT when no auth plugin is configured, and its
``AnonymousAuthPlugin`` marks every session anonymous, which turns off
persistent sessions. ``OpenAuthPlugin`` admits every client without marking it
anonymous, so ``clean_session = false`` devices keep their subscriptions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

log = logging.getLogger(__name__)


class OpenAuthPlugin(BaseAuthPlugin):
    """Admit every client (the device registry and credentials come with thing registration)."""

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool:
        """Accept the client."""
        return True
