"""The EMQX-format HTTP authentication and authorization endpoints (external broker mode).

They answer what the embedded broker would decide (``broker_hooks.auth.admits``, ``TopicAcl``) for
the same things; Debian's mosquitto has no HTTP authentication plugin, so here the requests are
made as EMQX makes them (its JSON body template, docs/external-broker.md) and the answers read
as EMQX reads them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.api.http_broker_auth import AUTHN_PATH, AUTHZ_PATH, MAX_FIELD_LENGTH, SECRET_HEADER
from server.app import FleetcmdApp
from tests.conftest import make_settings
from tests.mosquitto import Mosquitto, mosquitto

SECRET = "s3cret-s3cret-s3cret"
SERVICE = ("fleetcmd-svc", "svc-password")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with mosquitto(tmp_path / "mosquitto") as running:
        yield running


@pytest.fixture
async def app(tmp_path: Path, broker: Mosquitto) -> AsyncIterator[FleetcmdApp]:
    settings = make_settings(
        tmp_path / "data",
        allow_anonymous=False,
        broker_url=broker.url,
        broker_username=SERVICE[0],
        broker_password=SERVICE[1],
        broker_auth_secret=SECRET,
    )
    async with FleetcmdApp(settings) as running:
        yield running


@pytest.fixture
async def http(app: FleetcmdApp) -> AsyncIterator[aiohttp.ClientSession]:
    assert app.ports is not None
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", headers={SECRET_HEADER: SECRET}) as session:
        yield session


async def ask(http: aiohttp.ClientSession, path: str, body: Any, status: int = 200, **kw: Any) -> Any:
    async with http.post(path, json=body, **kw) as reply:
        assert reply.status == status, await reply.text()
        assert reply.content_type == "application/json"
        return await reply.json()


def authn(client: str, username: str, password: str) -> dict[str, str]:
    return {"clientid": client, "username": username, "password": password}


def authz(client: str, username: str, action: str, topic: str) -> dict[str, str]:
    return {"clientid": client, "username": username, "action": action, "topic": topic}


ALLOW = {"result": "allow", "is_superuser": False}
DENY = {"result": "deny", "is_superuser": False}


async def test_a_thing_is_admitted_with_its_current_password_only(app: FleetcmdApp, http: aiohttp.ClientSession) -> None:
    assert app.registry is not None
    _thing, password, _token = await app.registry.create_thing("dev-1", "", {})
    assert await ask(http, AUTHN_PATH, authn("dev-1", "dev-1", password)) == ALLOW
    assert await ask(http, AUTHN_PATH, authn("dev-1", "dev-1", password + "x")) == DENY
    assert await ask(http, AUTHN_PATH, authn("dev-1", "other", password)) == DENY  # username is the client id
    assert await ask(http, AUTHN_PATH, authn("dev-2", "dev-2", password)) == DENY  # unknown thing
    assert await ask(http, AUTHN_PATH, authn("dev-1", "", "")) == DENY  # no credentials, no Kaa endpoint
    # Rotated credentials: the old password is refused at the next connect.
    rotated, _token = await app.registry.rotate_credentials("dev-1")
    assert await ask(http, AUTHN_PATH, authn("dev-1", "dev-1", password)) == DENY
    assert await ask(http, AUTHN_PATH, authn("dev-1", "dev-1", rotated)) == ALLOW


async def test_the_service_account_is_a_superuser_and_its_name_is_reserved(http: aiohttp.ClientSession) -> None:
    assert await ask(http, AUTHN_PATH, authn("fleetcmd-a", *SERVICE)) == {"result": "allow", "is_superuser": True}
    assert await ask(http, AUTHN_PATH, authn("fleetcmd-a", SERVICE[0], "guess")) == DENY
    reply = await ask(
        http, AUTHZ_PATH, authz("fleetcmd-a", SERVICE[0], "subscribe", "$emqx/commands/things/+/executions/+/response")
    )
    assert reply["result"] == "allow"


async def test_a_thing_may_use_its_own_topics_only(app: FleetcmdApp, http: aiohttp.ClientSession) -> None:
    own = "$emqx/commands/things/dev-1/executions"
    other = "$emqx/commands/things/dev-2/executions"
    cases = [
        ("subscribe", f"{own}/+/request", "allow"),
        ("subscribe", f"{own}/e1/request", "allow"),
        ("publish", f"{own}/e1/response", "allow"),
        ("publish", f"{own}/e1/request", "deny"),  # never where requests come from
        ("subscribe", f"{other}/+/request", "deny"),
        ("publish", f"{other}/e1/response", "deny"),
        ("subscribe", "#", "deny"),
        ("subscribe", "$emqx/commands/things/+/executions/+/request", "deny"),
    ]
    for action, topic, result in cases:
        reply = await ask(http, AUTHZ_PATH, authz("dev-1", "dev-1", action, topic))
        assert reply["result"] == result, (action, topic)


async def test_a_kaa_device_without_credentials_gets_its_endpoint_topics(app: FleetcmdApp, http: aiohttp.ClientSession) -> None:
    assert app.registry is not None
    _thing, _password, token = await app.registry.create_thing("kaa-1", "", {}, kaa_app_version="av1")
    # Kaa firmware: a random client id, no username, no password (EMQX renders them as "").
    assert await ask(http, AUTHN_PATH, authn("K1234", "", "")) == ALLOW
    assert await ask(http, AUTHN_PATH, {"clientid": "K1234", "username": None, "password": None}) == ALLOW
    assert await ask(http, AUTHN_PATH, authn("kaa-1", "", "")) == DENY  # a registered thing's client id
    yes = await ask(http, AUTHZ_PATH, authz("K1234", "", "publish", f"kp1/av1/cex/{token}/result/reboot/1"))
    no = await ask(http, AUTHZ_PATH, authz("K1234", "", "publish", "kp1/av1/cex/not-a-token/result/reboot/1"))
    thing_topic = await ask(http, AUTHZ_PATH, authz("dev-1", "", "subscribe", "$emqx/commands/things/dev-1/executions/+/request"))
    assert (yes["result"], no["result"], thing_topic["result"]) == ("allow", "deny", "deny")


async def test_without_the_shared_secret_nothing_is_decided(app: FleetcmdApp) -> None:
    assert app.ports is not None
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}") as bare:
        for headers in ({}, {SECRET_HEADER: SECRET + "x"}, {SECRET_HEADER: ""}):
            reply = await ask(bare, AUTHN_PATH, authn("a", "a", "b"), 401, headers=headers)
            assert reply["code"] == "UNAUTHENTICATED"
            await ask(bare, AUTHZ_PATH, authz("a", "a", "publish", "t"), 401, headers=headers)


async def test_a_malformed_request_is_answered_400_naming_the_field(http: aiohttp.ClientSession) -> None:
    reply = await ask(http, AUTHZ_PATH, authz("a", "a", "retain", "t"), 400)
    assert reply["details"][0]["field"] == "action"
    reply = await ask(http, AUTHZ_PATH, {"clientid": "a", "username": "a", "action": "publish"}, 400)
    assert reply["details"][0]["field"] == "topic"
    reply = await ask(http, AUTHN_PATH, {"clientid": 7, "username": "a", "password": "b"}, 400)
    assert reply["details"][0]["field"] == "clientid"
    reply = await ask(http, AUTHN_PATH, ["not", "an", "object"], 400)
    assert reply["details"][0]["field"] == "body"


async def test_a_field_longer_than_the_bound_is_refused(http: aiohttp.ClientSession) -> None:
    at_bound = "a" * MAX_FIELD_LENGTH
    assert await ask(http, AUTHN_PATH, authn("a", "a", at_bound)) == DENY
    reply = await ask(http, AUTHN_PATH, authn("a", "a", at_bound + "a"), 400)
    assert reply["details"][0]["field"] == "password"


async def test_the_endpoints_are_off_without_a_secret(tmp_path: Path, broker: Mosquitto) -> None:
    async with FleetcmdApp(make_settings(tmp_path / "data", broker_url=broker.url)) as running:
        assert running.ports is not None
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{running.ports.http}") as bare,
            bare.post(AUTHN_PATH, json=authn("a", "a", "b"), headers={SECRET_HEADER: ""}) as reply,
        ):
            assert reply.status == 404
