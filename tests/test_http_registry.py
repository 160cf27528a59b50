"""The REST registry (issue 15 §1): things and thing types over HTTP, as gRPC ThingService serves them.

Real aiohttp calls on 127.0.0.1 (port 0) against a service in secure mode; presence comes from
real paho devices logging in with the credentials the REST answer carried. The list filters
are also checked against a brute-force filter over random registries (both index paths).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import pytest

from broker_hooks.topics import MAX_LEVEL_LENGTH
from server.api import pagination
from server.app import FleetcmdApp
from server.core.apikeys import Role
from server.core.models import ThingRecord
from server.core.registry import MAX_ATTRIBUTES, Registry, ThingIndex
from server.pb import registry_pb2 as rpb
from server.pb import registry_pb2_grpc as rpb_grpc
from tests.clients import admin_key, app_channel
from tests.devices import EmqxDevice
from tests.test_http_rest import TIMEOUT, Http, conforms, error
from tests.test_registry import wait_for

pytestmark = pytest.mark.secure

THINGS = "/api/v1/things"
TYPES = "/api/v1/thing-types"
DIMMER_PARAMS = {
    "type": "object",
    "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 100, "default": 50}},
    "required": ["level"],
}
LEVEL_RESULT = {"type": "object", "properties": {"level": {"type": "integer"}}}


@pytest.fixture
async def http(app: FleetcmdApp) -> AsyncIterator[Http]:
    assert app.ports is not None and app.ports.http
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.ports.http}", timeout=TIMEOUT) as session:
        yield Http(session, admin_key(app.settings.data_dir))


async def create(http: Http, thing_id: str, **fields: Any) -> dict[str, Any]:
    reply = await http.call("POST", THINGS, json={"thingId": thing_id, **fields})
    assert reply.status == 201, reply
    return reply.body  # type: ignore[no-any-return]


async def listed(http: Http, query: str = "", **kw: Any) -> list[str]:
    reply = await http.call("GET", f"{THINGS}?{query}", **kw)
    assert reply.status == 200, reply
    conforms("ListThingsResponse", reply.body)
    return [t["thingId"] for t in reply.body["things"]]


async def put_type(http: Http, name: str, **fields: Any) -> Any:
    return await http.call("PUT", f"{TYPES}/{name}", json=fields)


# ---- things -------------------------------------------------------------------------------


async def test_create_get_rotate_delete_a_thing(app: FleetcmdApp, http: Http) -> None:
    assert app.registry is not None and app.ports is not None and app.ports.mqtt
    assert (await put_type(http, "lamp")).status == 200
    created = await http.call("POST", THINGS, json={"thingId": "lamp-1", "thingType": "lamp", "attributes": {"site": "north"}})
    assert created.status == 201, created
    assert created.headers["Location"] == f"{THINGS}/lamp-1"
    conforms("CreateThingResponse", created.body)
    thing, credentials = created.body["thing"], created.body["credentials"]
    assert (thing["thingId"], thing["thingType"], thing["attributes"]) == ("lamp-1", "lamp", {"site": "north"})
    assert thing["online"] is False and thing["lastSeen"] is None and thing["createdAt"].endswith("Z")
    assert credentials["clientId"] == credentials["username"] == "lamp-1" and credentials["password"]
    assert credentials["kaaEndpointToken"] == ""

    got = await http.call("GET", f"{THINGS}/lamp-1")
    assert got.status == 200 and got.body == thing
    assert "password" not in str(got.body) and credentials["password"] not in str(got.body)

    # The device logs in with the answer's credentials: online, and last seen once it leaves.
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "lamp-1", username="lamp-1", password=credentials["password"]):

        async def online() -> bool:
            return bool((await http.call("GET", f"{THINGS}/lamp-1")).body["online"])

        await wait_for(online, "lamp-1 online")
        seen = (await http.call("GET", f"{THINGS}/lamp-1")).body
        conforms("Thing", seen)
        assert seen["connectedAt"] and seen["lastSeen"] and seen["remoteAddress"].startswith("127.0.0.1")

        rotated = await http.call("POST", f"{THINGS}/lamp-1/credentials")
        assert rotated.status == 200, rotated
        conforms("Credentials", rotated.body)
        assert rotated.body["password"] != credentials["password"]
    assert not app.registry.authenticate_device("lamp-1", "lamp-1", credentials["password"])
    assert app.registry.authenticate_device("lamp-1", "lamp-1", rotated.body["password"])

    error(await http.call("POST", THINGS, json={"thingId": "lamp-1"}), 409, "ALREADY_EXISTS")
    deleted = await http.call("DELETE", f"{THINGS}/lamp-1")
    assert deleted.status == 204 and deleted.body is None
    error(await http.call("GET", f"{THINGS}/lamp-1"), 404, "NOT_FOUND")
    error(await http.call("DELETE", f"{THINGS}/lamp-1"), 404, "NOT_FOUND")
    error(await http.call("POST", f"{THINGS}/lamp-1/credentials"), 404, "NOT_FOUND")


async def test_a_kaa_endpoint_gets_its_token(http: Http) -> None:
    body = await create(http, "kaa-1", kaaAppVersion="app-v1")
    assert body["thing"]["kaaAppVersion"] == "app-v1" and body["credentials"]["kaaEndpointToken"]
    rotated = await http.call("POST", f"{THINGS}/kaa-1/credentials")
    assert rotated.body["kaaEndpointToken"] not in ("", body["credentials"]["kaaEndpointToken"])


async def test_create_names_every_bad_field_as_rest_spells_it(http: Http) -> None:
    bad = error(
        await http.call("POST", THINGS, json={"thingId": "a/b", "thingType": 5, "attributes": {"k": 1}}),
        400,
        "INVALID_ARGUMENT",
    )
    assert set(bad) == {"thingId", "thingType", "attributes['k']"}
    assert "required" in error(await http.call("POST", THINGS, json={}), 400, "INVALID_ARGUMENT")["thingId"]
    assert "empty" in error(await http.call("POST", THINGS, json={"thingId": ""}), 400, "INVALID_ARGUMENT")["thingId"]
    # Any character a topic level allows, a newline too, is a thing id; its Location is a quoted URL path.
    odd = await http.call("POST", THINGS, json={"thingId": "a\nb c%"})
    assert odd.status == 201 and odd.headers["Location"] == f"{THINGS}/a%0Ab%20c%25"
    assert (await http.call("GET", odd.headers["Location"])).body["thingId"] == "a\nb c%"
    unknown = error(await http.call("POST", THINGS, json={"thingId": "t", "thingType": "nope"}), 400, "INVALID_ARGUMENT")
    assert set(unknown) == {"thingType"} and "thing_type" not in unknown["thingType"]
    version = error(await http.call("POST", THINGS, json={"thingId": "t", "kaaAppVersion": "a/b"}), 400, "INVALID_ARGUMENT")
    assert set(version) == {"kaaAppVersion"}
    error(await http.call("GET", f"{THINGS}/$bad"), 400, "INVALID_ARGUMENT")
    # At the bound: 64 attributes are taken, 65 refused.
    at_bound = {f"k{i}": "v" for i in range(MAX_ATTRIBUTES)}
    await create(http, "many", attributes=at_bound)
    over = error(
        await http.call("POST", THINGS, json={"thingId": "more", "attributes": {**at_bound, "one": "more"}}),
        400,
        "INVALID_ARGUMENT",
    )
    assert set(over) == {"attributes"}


async def test_list_filters_type_attributes_presence_and_prefix(app: FleetcmdApp, http: Http) -> None:
    assert app.ports is not None and app.ports.mqtt
    for name in ("lamp", "meter"):
        assert (await put_type(http, name)).status == 200
    await create(http, "a1", thingType="lamp", attributes={"site": "north", "floor": "1"})
    await create(http, "a2", thingType="lamp", attributes={"site": "south"})
    await create(http, "b1", thingType="meter", attributes={"site": "north", "floor": "2"})
    on = await create(http, "c1", attributes={"site": "north", "eq": "x=y"})
    assert await listed(http) == ["a1", "a2", "b1", "c1"]
    assert await listed(http, "thingType=lamp") == ["a1", "a2"]
    assert await listed(http, "thingType=none") == []
    assert await listed(http, "attribute=site=north") == ["a1", "b1", "c1"]
    assert await listed(http, "attribute=site=north&attribute=floor=2") == ["b1"]
    assert await listed(http, "thingType=lamp&attribute=site=south") == ["a2"]
    assert await listed(http, "attribute=eq=x%3Dy") == ["c1"]  # the first '=' splits
    # AND: one key cannot have two values.
    assert await listed(http, "attribute=site=north&attribute=site=south") == []
    assert await listed(http, "q=a") == ["a1", "a2"]
    assert await listed(http, "q=a2") == ["a2"]
    assert await listed(http, "q=b&attribute=site=north") == ["b1"]
    assert await listed(http, "q=z") == []
    assert await listed(http, "presence=offline") == ["a1", "a2", "b1", "c1"]
    assert await listed(http, "presence=online") == []
    async with EmqxDevice("127.0.0.1", app.ports.mqtt, "c1", username="c1", password=on["credentials"]["password"]):

        async def online() -> bool:
            return await listed(http, "presence=online") == ["c1"]

        await wait_for(online, "c1 online")
        assert await listed(http, "presence=offline") == ["a1", "a2", "b1"]
        assert await listed(http, "presence=online&attribute=site=north") == ["c1"]
        assert await listed(http, "presence=online&thingType=lamp") == []


async def test_list_bounds_and_bad_filters(http: Http) -> None:
    at_bound = "&".join(f"attribute=k{i}=v" for i in range(MAX_ATTRIBUTES))
    assert await listed(http, at_bound) == []
    over = error(await http.call("GET", f"{THINGS}?{at_bound}&attribute=one=more"), 400, "INVALID_ARGUMENT")
    assert set(over) == {"attribute"}
    assert await listed(http, "q=" + "q" * MAX_LEVEL_LENGTH) == []
    assert set(error(await http.call("GET", f"{THINGS}?q={'q' * (MAX_LEVEL_LENGTH + 1)}"), 400, "INVALID_ARGUMENT")) == {"q"}
    assert await listed(http, f"pageSize={pagination.MAX_PAGE_SIZE}") == []
    too_big = error(await http.call("GET", f"{THINGS}?pageSize={pagination.MAX_PAGE_SIZE + 1}"), 400, "INVALID_ARGUMENT")
    assert set(too_big) == {"pageSize"}
    bad = error(
        await http.call("GET", f"{THINGS}?presence=maybe&attribute=novalue&attribute==v&pageSize=x"), 400, "INVALID_ARGUMENT"
    )
    assert set(bad) == {"presence", "attribute", "pageSize"}
    error(await http.call("GET", f"{THINGS}?pageToken=forged"), 400, "INVALID_ARGUMENT")


async def test_pages_follow_each_other_and_tokens_are_good_on_grpc(app: FleetcmdApp, http: Http) -> None:
    for i in range(7):
        await create(http, f"p{i}", attributes={"site": "north" if i % 2 else "south"})
    seen: list[str] = []
    token = ""
    while True:
        reply = await http.call("GET", f"{THINGS}?pageSize=2&attribute=site=north&pageToken={token}")
        assert reply.status == 200, reply
        seen += [t["thingId"] for t in reply.body["things"]]
        token = reply.body["nextPageToken"]
        if not token:
            break
    assert seen == ["p1", "p3", "p5"]
    # A token is bound to its filters ...
    first = await http.call("GET", f"{THINGS}?pageSize=2&q=p")
    error(await http.call("GET", f"{THINGS}?pageSize=2&pageToken={first.body['nextPageToken']}"), 400, "INVALID_ARGUMENT")
    # ... and without a prefix it is the gRPC surface's: a REST token continues a gRPC list.
    first = await http.call("GET", f"{THINGS}?pageSize=3&presence=offline")
    async with app_channel(app) as channel:
        rest = await rpb_grpc.ThingServiceStub(channel).ListThings(
            rpb.ListThingsRequest(presence=rpb.OFFLINE, page_size=10, page_token=first.body["nextPageToken"])
        )
    assert [t["thingId"] for t in first.body["things"]] + [t.thing_id for t in rest.things] == [f"p{i}" for i in range(7)]


async def test_roles(app: FleetcmdApp, http: Http) -> None:
    assert app.keys is not None
    await create(http, "r1")
    assert (await put_type(http, "rt")).status == 200
    _, viewer = await app.keys.create("viewer", Role.VIEWER)
    _, operator = await app.keys.create("operator", Role.OPERATOR)
    for key in (viewer, operator):
        assert await listed(http, key=key) == ["r1"]
        assert (await http.call("GET", f"{THINGS}/r1", key=key)).status == 200
        assert (await http.call("GET", TYPES, key=key)).status == 200
        assert (await http.call("GET", f"{TYPES}/rt", key=key)).status == 200
        error(await http.call("POST", THINGS, key=key, json={"thingId": "r2"}), 403, "PERMISSION_DENIED")
        error(await http.call("POST", f"{THINGS}/r1/credentials", key=key), 403, "PERMISSION_DENIED")
        error(await http.call("DELETE", f"{THINGS}/r1", key=key), 403, "PERMISSION_DENIED")
        error(await http.call("PUT", f"{TYPES}/rt", key=key, json={}), 403, "PERMISSION_DENIED")
        error(await http.call("DELETE", f"{TYPES}/rt", key=key), 403, "PERMISSION_DENIED")
    for method, path in (("GET", THINGS), ("GET", f"{THINGS}/r1"), ("POST", THINGS), ("GET", TYPES), ("PUT", f"{TYPES}/x")):
        error(await http.call(method, path, key=None, json={}), 401, "UNAUTHENTICATED")


# ---- thing types --------------------------------------------------------------------------


async def test_thing_type_put_get_list_delete_with_schemas_as_json(app: FleetcmdApp, http: Http) -> None:
    commands = {
        "dim": {
            "description": "Dim the lamp",
            "paramsSchema": DIMMER_PARAMS,
            "resultSchema": LEVEL_RESULT,
            "defaultTtlSeconds": 20,
        },
        "reboot": {},
    }
    put = await put_type(http, "dimmer", description="A dimmable lamp", commands=commands)
    assert put.status == 200, put
    conforms("ThingType", put.body)
    assert put.body["version"] == 1 and put.body["description"] == "A dimmable lamp"
    dim = put.body["commands"]["dim"]
    assert dim["paramsSchema"] == DIMMER_PARAMS and dim["resultSchema"] == LEVEL_RESULT and dim["defaultTtlSeconds"] == 20
    assert put.body["commands"]["reboot"] == {
        "description": "",
        "paramsSchema": None,
        "resultSchema": None,
        "defaultTtlSeconds": 0,
    }
    # The schema's key order is kept (a form generated from it shows the fields in that order).
    got = await http.call("GET", f"{TYPES}/dimmer")
    assert got.status == 200 and got.body == put.body
    assert list(got.body["commands"]["dim"]["paramsSchema"]) == list(DIMMER_PARAMS)
    # The schema is the one Send checks: default filled, range enforced.
    await create(http, "d1", thingType="dimmer")
    sent = await http.call("POST", "/api/v1/commands", json={"thingId": "d1", "action": "dim"})
    assert sent.status == 202 and sent.body["params"] == {"level": 50} and sent.body["ttl"] == 20
    refused = await http.call("POST", "/api/v1/commands", json={"thingId": "d1", "action": "dim", "params": {"level": 101}})
    assert set(error(refused, 400, "INVALID_ARGUMENT")) == {"params.level"}

    again = await put_type(http, "dimmer", description="v2", allowUndefinedActions=True)
    assert again.body["version"] == 2 and again.body["commands"] == {} and again.body["allowUndefinedActions"] is True
    assert (await put_type(http, "another")).status == 200
    listing = await http.call("GET", f"{TYPES}?pageSize=1")
    conforms("ListThingTypesResponse", listing.body)
    assert [t["name"] for t in listing.body["thingTypes"]] == ["another"]
    rest = await http.call("GET", f"{TYPES}?pageSize=1&pageToken={listing.body['nextPageToken']}")
    assert [t["name"] for t in rest.body["thingTypes"]] == ["dimmer"] and rest.body["nextPageToken"] == ""

    in_use = error(await http.call("DELETE", f"{TYPES}/dimmer"), 409, "FAILED_PRECONDITION")
    assert in_use == {} and "1 thing" in (await http.call("DELETE", f"{TYPES}/dimmer")).body["message"]
    assert (await http.call("DELETE", f"{THINGS}/d1")).status == 204
    assert (await http.call("DELETE", f"{TYPES}/dimmer")).status == 204
    error(await http.call("GET", f"{TYPES}/dimmer"), 404, "NOT_FOUND")
    error(await http.call("DELETE", f"{TYPES}/dimmer"), 404, "NOT_FOUND")


async def test_thing_type_errors_name_rest_fields(app: FleetcmdApp, http: Http) -> None:
    bad_schema = {"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}}
    reply = await put_type(
        http,
        "t1",
        commands={
            "a": {"paramsSchema": bad_schema},
            "b": {"resultSchema": "{}"},
            "c": {"defaultTtlSeconds": app.settings.max_ttl + 1},
            "d": 5,
        },
        allowUndefinedActions="yes",
    )
    fields = error(reply, 400, "INVALID_ARGUMENT")
    assert set(fields) == {"commands['b'].resultSchema", "commands['d']", "allowUndefinedActions"}
    # What only the registry can judge is named alike.
    reply = await put_type(
        http, "t1", commands={"a": {"paramsSchema": bad_schema}, "c": {"defaultTtlSeconds": app.settings.max_ttl + 1}}
    )
    assert set(error(reply, 400, "INVALID_ARGUMENT")) == {"commands['a'].paramsSchema", "commands['c'].defaultTtlSeconds"}
    at_bound = await put_type(http, "t1", commands={"c": {"defaultTtlSeconds": app.settings.max_ttl}})
    assert at_bound.status == 200
    assert set(error(await put_type(http, "bad name"), 400, "INVALID_ARGUMENT")) == {"name"}
    for body in (b"[1]", b"null"):
        sent = await http.call("PUT", f"{TYPES}/t2", data=body, headers={"Content-Type": "application/json"})
        assert set(error(sent, 400, "INVALID_ARGUMENT")) == {"body"}
    # No body at all: an empty type.
    empty = await http.call("PUT", f"{TYPES}/t2")
    assert empty.status == 200 and empty.body["commands"] == {} and empty.body["description"] == ""


# ---- the index behind the list --------------------------------------------------------------


def _thing(thing_id: str, thing_type: str, attributes: dict[str, str]) -> ThingRecord:
    return ThingRecord(thing_id, thing_type, attributes, "hash", 0, 0, 0)


@pytest.mark.parametrize("seed", range(6))
def test_index_pages_match_a_brute_force_filter(seed: int) -> None:
    """Random registries, edits and filters: every page is what filtering everything would give.

    Seeds alternate a few things per type (the sparse indexes are read) and many (the sorted ids are scanned).
    """
    rnd = random.Random(seed)
    types = ["a", "b"] if seed % 2 else [f"t{i}" for i in range(12)]
    index = ThingIndex()
    things: dict[str, ThingRecord] = {}
    online: set[str] = set()
    for _ in range(300):
        thing_id = "".join(rnd.choices("abc", k=rnd.randint(1, 4))) + str(rnd.randint(0, 99))
        record = _thing(thing_id, rnd.choice([*types, ""]), {"site": rnd.choice("nsew"), "floor": rnd.choice("12")})
        if thing_id in things:
            index.replace(things[thing_id], record)
        else:
            index.add(record)
        things[thing_id] = record
        if rnd.random() < 0.2:
            online.add(thing_id)
            index.online.add(thing_id)
    for gone in rnd.sample(sorted(things), 40):
        index.remove(things.pop(gone))
        online.discard(gone)
    assert len(index) == len(things)
    registry = Registry(cast(Any, None))  # no store: list_things reads memory only
    registry._things, registry._index = things, index
    for _ in range(200):
        thing_type = rnd.choice([*types, "", "", "zz"])
        attributes = rnd.choice([{}, {"site": rnd.choice("nsewx")}, {"site": rnd.choice("nsew"), "floor": rnd.choice("12")}])
        presence = rnd.choice([None, True, False])
        prefix = rnd.choice(["", "", "a", "ab", "c1", "b"])
        limit = rnd.randint(1, 30)
        want = [
            t
            for t in sorted(things)
            if (not thing_type or things[t].thing_type == thing_type)
            and all(things[t].attributes.get(k) == v for k, v in attributes.items())
            and (presence is None or (t in online) == presence)
            and t.startswith(prefix)
        ]
        got: list[str] = []
        after = ""
        while True:
            page, last = registry.list_things(
                thing_type=thing_type, attributes=attributes, online=presence, prefix=prefix, after=after, limit=limit
            )
            assert len(page) <= limit
            got += [t.thing_id for t in page]
            if last is None:
                break
            after = last
        assert got == want, (thing_type, attributes, presence, prefix, limit)


def test_index_forgets_what_was_removed_or_changed() -> None:
    index = ThingIndex()
    old = _thing("x", "lamp", {"site": "n"})
    index.add(old)
    index.add(_thing("y", "", {}))
    new = _thing("x", "meter", {"site": "s"})
    index.replace(old, new)
    assert index._by_type == {"meter": {"x"}} and index._by_attribute == {"site": {"s": {"x"}}}
    index.online.add("x")
    index.remove(new)
    assert index._ids == ["y"] and index._by_type == {} and index._by_attribute == {} and index.online == set()
