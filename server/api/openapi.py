"""The OpenAPI 3.1 document of the HTTP API, served at ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from broker_hooks.topics import MAX_LEVEL_LENGTH
from server.api import http_broker_auth
from server.core import job_runner, jobs
from server.core.lifecycle import Status
from server.core.registry import MAX_ATTRIBUTE_KEY, MAX_ATTRIBUTE_VALUE, MAX_ATTRIBUTES, MAX_DESCRIPTION, TYPE_NAME
from server.core.schemas import MAX_SCHEMA_DEPTH
from server.core.validation import MAX_ACTION_LENGTH, MAX_IDEMPOTENCY_KEY_LENGTH, MAX_WAIT_SECONDS

UINT32_MAX = 2**32 - 1


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


# One ``status`` query value: ExecutionStatus names in any case, comma-separated, blanks ignored.
_STATUS_NAME = "(" + "|".join(_any_case(s.name) for s in Status) + ")"
_STATUS_LIST = rf"^\s*{_STATUS_NAME}?\s*(,\s*{_STATUS_NAME}?\s*)*$"
_JOB_STATE_NAME = "(" + "|".join(_any_case(s.name) for s in jobs.JobState) + ")"
_JOB_STATE_LIST = rf"^\s*{_JOB_STATE_NAME}?\s*(,\s*{_JOB_STATE_NAME}?\s*)*$"


ERROR_CODES = [
    "INVALID_ARGUMENT",
    "UNAUTHENTICATED",
    "PERMISSION_DENIED",
    "NOT_FOUND",
    "METHOD_NOT_ALLOWED",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "PAYLOAD_TOO_LARGE",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "INTERNAL",
]

_TIME = {
    "type": "string",
    "format": "date-time",
    "description": "RFC 3339, UTC, millisecond precision, e.g. 2026-01-02T03:04:05.678Z",
}
_NULLABLE_TIME = {**_TIME, "type": ["string", "null"]}
_ANY_JSON = {"description": "Any JSON value."}
# One MQTT topic level (broker_hooks.topics.level_problem): no separator, wildcard or NUL, not starting with '$'.
_LEVEL = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_LEVEL_LENGTH,
    "pattern": "^[^$/+#\\x00][^/+#\\x00]*$",
    "description": "One MQTT topic level: no '/', '+', '#' or NUL, not starting with '$'.",
}
# An empty filter is no filter.
_TIME_FILTER = {"anyOf": [_TIME, {"type": "string", "maxLength": 0}]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": _json(_ref("Error"))}
    if headers:
        out["headers"] = headers
    return out


def _responses(*names: str) -> dict[str, Any]:
    return {status: {"$ref": f"#/components/responses/{name}"} for status, name in (n.split(":") for n in names)}


_AUTH_ERRORS = ("400:BadRequest", "401:Unauthorized", "403:Forbidden", "413:PayloadTooLarge", "503:Unavailable")

_EXECUTION_ID = {
    "name": "executionId",
    "in": "path",
    "required": True,
    "schema": _LEVEL,
}
_WAIT_QUERY = {
    "name": "waitSeconds",
    "in": "query",
    "required": False,
    "description": "As waitSeconds in the body (the body wins when both are given).",
    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
}

_SENT_OR_ACCEPTED = {
    "200": {"description": "The execution, final (within waitSeconds).", "content": _json(_ref("Execution"))},
    "202": {
        "description": "The execution, not final yet; follow Location.",
        "headers": {"Location": {"description": "/api/v1/commands/{executionId}", "schema": {"type": "string"}}},
        "content": _json(_ref("Execution")),
    },
}


def _schemas() -> dict[str, Any]:
    status_reason = {
        "type": ["object", "null"],
        "description": 'Why the device reported its status (Kaa: reasonCode is the statusCode, e.g. "200").',
        "properties": {"reasonCode": {"type": "string"}, "reasonDescription": {"type": "string"}},
        "required": ["reasonCode", "reasonDescription"],
    }
    return {
        "ExecutionStatus": {
            "type": "string",
            "enum": [s.name for s in Status],
            "description": "QUEUED (device not reachable yet), SENT, DELIVERED (PUBACKed), IN_PROGRESS; final: "
            "SUCCEEDED, FAILED, REJECTED, TIMED_OUT, CANCELED.",
        },
        "StatusReason": status_reason,
        "StateChange": {
            "type": "object",
            "properties": {
                "sequence": {"type": "integer", "description": "Position in the global event log."},
                "status": _ref("ExecutionStatus"),
                "previousStatus": {"anyOf": [_ref("ExecutionStatus"), {"type": "null"}]},
                "at": _TIME,
                "late": {"type": "boolean", "description": "Reported after the execution was final; kept, status unchanged."},
                "result": _ANY_JSON,
                "statusReason": _ref("StatusReason"),
                "note": {"type": "string"},
            },
            "required": ["sequence", "status", "previousStatus", "at", "late", "result", "statusReason", "note"],
        },
        "Execution": {
            "type": "object",
            "properties": {
                "executionId": {"type": "string"},
                "commandId": {"type": "string"},
                "thingId": {"type": "string"},
                "action": {"type": "string"},
                "params": {"type": ["object", "null"]},
                "ttl": {"type": "integer", "description": "Seconds the device has to answer."},
                "status": _ref("ExecutionStatus"),
                "result": {**_ANY_JSON, "description": "What the device sent with its final (or latest) status."},
                "statusReason": _ref("StatusReason"),
                "createdAt": _TIME,
                "updatedAt": _TIME,
                "completedAt": _NULLABLE_TIME,
                "expiresAt": _TIME,
                "idempotencyKey": {"type": ["string", "null"]},
                "thingType": {"type": ["string", "null"]},
                "resultViolations": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Where the result violates the action's result schema (stored anyway).",
                },
                "rerunOf": {"type": ["string", "null"], "description": "The execution this one re-runs."},
                "kaaCommandId": {
                    "type": ["integer", "null"],
                    "description": "Kaa endpoints: the integer command id the device sees.",
                },
                "jobId": {"type": ["string", "null"], "description": "The job that created this execution."},
                "retryOf": {"type": ["string", "null"], "description": "A job's retry: the execution it repeats."},
                "reruns": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Re-runs of this execution, oldest first (GET of one execution only).",
                },
                "history": {
                    "type": "array",
                    "items": _ref("StateChange"),
                    "description": "State changes, oldest first (GET of one execution only).",
                },
            },
            "required": [
                "executionId",
                "commandId",
                "thingId",
                "action",
                "params",
                "ttl",
                "status",
                "result",
                "statusReason",
                "createdAt",
                "updatedAt",
                "completedAt",
                "expiresAt",
                "idempotencyKey",
                "thingType",
                "resultViolations",
                "rerunOf",
                "kaaCommandId",
                "jobId",
                "retryOf",
            ],
        },
        "SendRequest": {
            "type": "object",
            "properties": {
                "thingId": _LEVEL,
                "action": {"type": "string", "minLength": 1, "maxLength": MAX_ACTION_LENGTH},
                "params": {"type": ["object", "null"], "description": "At most 64 KiB as JSON (max_params_bytes)."},
                "ttl": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "description": "Seconds; 0, null or absent = the default (max_ttl at most).",
                },
                "idempotencyKey": {"type": ["string", "null"], "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH},
                "waitSeconds": {
                    "type": ["integer", "null"],
                    "minimum": 0,
                    "maximum": MAX_WAIT_SECONDS,
                    "description": "Answer as soon as the execution is final, or after this many seconds as it is then.",
                },
            },
            "required": ["thingId", "action"],
        },
        "RerunRequest": {
            "type": "object",
            "properties": {"waitSeconds": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_WAIT_SECONDS}},
        },
        "ListResponse": {
            "type": "object",
            "properties": {
                "executions": {"type": "array", "items": _ref("Execution")},
                "nextPageToken": {"type": "string", "description": "Empty on the last page."},
            },
            "required": ["executions", "nextPageToken"],
        },
        "FieldViolation": {
            "type": "object",
            "properties": {"field": {"type": "string"}, "description": {"type": "string"}},
            "required": ["field", "description"],
        },
        "Error": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "enum": ERROR_CODES},
                "message": {"type": "string"},
                "details": {"type": "array", "items": _ref("FieldViolation"), "description": "One per bad field (400)."},
            },
            "required": ["code", "message", "details"],
        },
        **_registry_schemas(),
        "JobEvent": {
            "type": "object",
            "description": "The data of one `event: job` of GET /api/v1/events: a job's state or counts changed "
            "(count changes of one commit come as one event per job).",
            "properties": {
                "seq": {"type": "integer", "minimum": 1, "description": "The event's sequence (also its SSE id)."},
                "job": {
                    "allOf": [_ref("JobOfEvent")],
                    "description": "The job right after the change, as GET /api/v1/jobs/{jobId} shows it; its spec "
                    "only in the job's first event.",
                },
            },
            "required": ["seq", "job"],
            "additionalProperties": False,
        },
        "ExecutionEvent": {
            "type": "object",
            "description": "The data of one `event: execution` of GET /api/v1/events.",
            "properties": {
                "seq": {"type": "integer", "minimum": 1, "description": "The event's sequence (also its SSE id)."},
                "execution": {
                    "anyOf": [_ref("Execution"), {"type": "null"}],
                    "description": "The execution as it is when the event is written (it may be past `change`); "
                    "null when retention deleted it.",
                },
                "change": {
                    "allOf": [_ref("StateChange")],
                    "type": "object",
                    "properties": {
                        "executionId": {"type": "string"},
                        "thingId": {"type": "string"},
                        "action": {"type": "string"},
                        "jobId": {"type": "string", "description": "The execution's job (absent for a single command)."},
                    },
                    "required": ["executionId", "thingId", "action"],
                },
            },
            "required": ["seq", "execution", "change"],
        },
        "KaaPollRequest": {
            "type": "object",
            "properties": {"observe": {"type": "boolean", "description": "Accepted and ignored over HTTP."}},
        },
        "KaaCommand": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1}, "payload": _ANY_JSON},
            "required": ["id", "payload"],
        },
        "KaaResult": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "statusCode": {"type": "integer", "description": "2xx SUCCEEDED, 4xx REJECTED, else FAILED."},
                "reasonPhrase": {"type": "string", "maxLength": 1024},
                "payload": _ANY_JSON,
            },
            "required": ["id", "statusCode"],
        },
        "KaaError": {
            "type": "object",
            "properties": {"statusCode": {"type": "integer"}, "reasonPhrase": {"type": "string"}},
            "required": ["statusCode", "reasonPhrase"],
        },
    }


_ATTRIBUTES = {
    "type": "object",
    "maxProperties": MAX_ATTRIBUTES,
    "propertyNames": {"minLength": 1, "maxLength": MAX_ATTRIBUTE_KEY},
    "additionalProperties": {"type": "string", "maxLength": MAX_ATTRIBUTE_VALUE},
}
_JSON_SCHEMA = {
    "type": ["object", "boolean", "null"],
    "description": f"A JSON Schema (draft 2020-12), at most {MAX_SCHEMA_DEPTH} levels deep; null: none. "
    "A schema the server cannot use (unknown $ref, bad pattern, ...) is a 400 naming it.",
}


def _registry_schemas() -> dict[str, Any]:
    command = {
        "type": "object",
        "properties": {
            "description": {"type": "string"},
            "paramsSchema": _JSON_SCHEMA,
            "resultSchema": _JSON_SCHEMA,
            "defaultTtlSeconds": {
                "type": "integer",
                "minimum": 0,
                "description": "0: the service default; at most the service's max_ttl.",
            },
        },
        "required": ["description", "paramsSchema", "resultSchema", "defaultTtlSeconds"],
    }
    command_input = {
        "type": "object",
        "properties": {
            "description": {"type": ["string", "null"], "maxLength": MAX_DESCRIPTION},
            "paramsSchema": _JSON_SCHEMA,
            "resultSchema": _JSON_SCHEMA,
            "defaultTtlSeconds": {"type": ["integer", "null"], "minimum": 0, "description": "At most the service's max_ttl."},
        },
    }
    action_names = {"minLength": 1, "maxLength": 128}
    return {
        "Thing": {
            "type": "object",
            "properties": {
                "thingId": {"type": "string"},
                "thingType": {"type": "string", "description": "Empty: no type."},
                "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
                "online": {"type": "boolean"},
                "lastSeen": {**_NULLABLE_TIME, "description": "When the device last sent anything (null: never)."},
                "connectedAt": _NULLABLE_TIME,
                "clientId": {"type": "string", "description": "MQTT client id of the last connection."},
                "remoteAddress": {"type": "string"},
                "createdAt": _TIME,
                "updatedAt": _TIME,
                "credentialsRotatedAt": _TIME,
                "kaaAppVersion": {"type": "string", "description": "Kaa endpoints: the application version."},
            },
            "required": [
                "thingId",
                "thingType",
                "attributes",
                "online",
                "lastSeen",
                "connectedAt",
                "clientId",
                "remoteAddress",
                "createdAt",
                "updatedAt",
                "credentialsRotatedAt",
                "kaaAppVersion",
            ],
        },
        "Credentials": {
            "type": "object",
            "description": "Shown once: the server keeps only hashes.",
            "properties": {
                "clientId": {"type": "string"},
                "username": {"type": "string"},
                "password": {"type": "string"},
                "kaaEndpointToken": {"type": "string", "description": "Kaa endpoints only; else empty."},
            },
            "required": ["clientId", "username", "password", "kaaEndpointToken"],
        },
        "CreateThingRequest": {
            "type": "object",
            "properties": {
                "thingId": _LEVEL,
                "thingType": {"type": ["string", "null"], "description": "An existing thing type; empty: none."},
                "attributes": {**_ATTRIBUTES, "type": ["object", "null"]},
                "kaaAppVersion": {
                    "anyOf": [_LEVEL, {"type": ["string", "null"], "maxLength": 0}, {"type": "null"}],
                    "description": "Register a Kaa endpoint of this application version (the answer carries its token).",
                },
            },
            "required": ["thingId"],
        },
        "CreateThingResponse": {
            "type": "object",
            "properties": {"thing": _ref("Thing"), "credentials": _ref("Credentials")},
            "required": ["thing", "credentials"],
        },
        "ListThingsResponse": {
            "type": "object",
            "properties": {
                "things": {"type": "array", "items": _ref("Thing")},
                "nextPageToken": {"type": "string", "description": "Empty on the last page."},
            },
            "required": ["things", "nextPageToken"],
        },
        "CommandDefinition": command,
        "ThingType": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "commands": {"type": "object", "additionalProperties": _ref("CommandDefinition")},
                "allowUndefinedActions": {"type": "boolean"},
                "version": {"type": "integer", "description": "One more on every PUT."},
                "createdAt": _TIME,
                "updatedAt": _TIME,
            },
            "required": ["name", "description", "commands", "allowUndefinedActions", "version", "createdAt", "updatedAt"],
        },
        "PutThingTypeRequest": {
            "type": "object",
            "properties": {
                "description": {"type": ["string", "null"], "maxLength": MAX_DESCRIPTION},
                "commands": {
                    "type": ["object", "null"],
                    "propertyNames": action_names,
                    "additionalProperties": command_input,
                },
                "allowUndefinedActions": {
                    "type": ["boolean", "null"],
                    "description": "Accept actions the type does not define (unchecked).",
                },
            },
        },
        "ListThingTypesResponse": {
            "type": "object",
            "properties": {
                "thingTypes": {"type": "array", "items": _ref("ThingType")},
                "nextPageToken": {"type": "string", "description": "Empty on the last page."},
            },
            "required": ["thingTypes", "nextPageToken"],
        },
    }


def _responses_component() -> dict[str, Any]:
    return {
        "BadRequest": _error("Invalid request: details names each bad field (code INVALID_ARGUMENT)."),
        "Unauthorized": _error(
            "No valid API key (code UNAUTHENTICATED).",
            {"WWW-Authenticate": {"schema": {"type": "string"}}},
        ),
        "Forbidden": _error("The key's role is too weak (code PERMISSION_DENIED)."),
        "NotFound": _error("No such execution, thing or thing type (code NOT_FOUND)."),
        "Conflict": _error(
            "ALREADY_EXISTS: the idempotency key belongs to another request, or the thing id is taken; "
            "FAILED_PRECONDITION: the execution is already final, the thing type is in use, or (events) "
            "retention deleted events after the resume point."
        ),
        "PayloadTooLarge": _error("The body is larger than the server accepts (1 MiB by default; code PAYLOAD_TOO_LARGE)."),
        "TooManyRequests": _error(
            "Too many active executions (code RESOURCE_EXHAUSTED).",
            {"Retry-After": {"schema": {"type": "integer"}}},
        ),
        "Unavailable": _error("The service is stopping (code UNAVAILABLE)."),
        "KaaError": {"description": "KP1 error.", "content": _json(_ref("KaaError"))},
    }


def _kaa_path(kind: str) -> dict[str, Any]:
    params = [
        {"name": "appVersion", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}, "description": "Endpoint token."},
        {"name": "commandType", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9]+$"}},
    ]
    kaa_errors = {
        "400": {"$ref": "#/components/responses/KaaError"},
        "401": {"$ref": "#/components/responses/KaaError"},
        "413": {"$ref": "#/components/responses/KaaError"},
    }
    if kind == "command":
        return {
            "post": {
                "tags": ["kaa"],
                "operationId": "kaaPollCommands",
                "summary": "Kaa KP1: every outstanding command of the type (handing one out makes it SENT)",
                "security": [],
                "parameters": params,
                "requestBody": {"required": False, "content": _json(_ref("KaaPollRequest"))},
                "responses": {
                    "200": {
                        "description": "Outstanding commands, oldest first.",
                        "content": _json({"type": "array", "items": _ref("KaaCommand")}),
                    },
                    **kaa_errors,
                },
            }
        }
    return {
        "post": {
            "tags": ["kaa"],
            "operationId": "kaaReportResults",
            "summary": "Kaa KP1: report results (an array, or a single object)",
            "description": "400 names every refused item (404 when all of them name unknown commands); the valid "
            "items of the same request are applied. An empty array is a no-op.",
            "security": [],
            "parameters": params,
            "requestBody": {
                "required": True,
                "content": _json({"oneOf": [{"type": "array", "items": _ref("KaaResult")}, _ref("KaaResult")]}),
            },
            "responses": {
                "200": {"description": "Every result was applied.", "content": _json({"type": "object"})},
                "404": {"$ref": "#/components/responses/KaaError"},
                **kaa_errors,
            },
        }
    }


_PAGE_QUERY = [
    {
        "name": "pageSize",
        "in": "query",
        "description": "Default 50.",
        "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    {
        "name": "pageToken",
        "in": "query",
        "description": "nextPageToken of the previous page (with the same filters).",
        "schema": {"type": "string"},
    },
]
_THING_ID = {"name": "thingId", "in": "path", "required": True, "schema": _LEVEL}
_TYPE_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": TYPE_NAME.pattern}}
_READ_ERRORS = ("400:BadRequest", "401:Unauthorized", "403:Forbidden", "503:Unavailable")


def _registry_paths() -> dict[str, Any]:
    thing = _json(_ref("Thing"))
    deleted = {"204": {"description": "Deleted."}}
    return {
        "/api/v1/things": {
            "get": {
                "tags": ["things"],
                "operationId": "listThings",
                "summary": "List things sorted by id, filters ANDed (viewer)",
                "parameters": [
                    {"name": "thingType", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "attribute",
                        "in": "query",
                        "description": "Repeatable key=value (the first '=' splits): things with every one of them.",
                        "schema": {
                            "type": "array",
                            "maxItems": MAX_ATTRIBUTES,
                            "items": {
                                "type": "string",
                                "pattern": f"^[^=]{{1,{MAX_ATTRIBUTE_KEY}}}=[\\s\\S]{{0,{MAX_ATTRIBUTE_VALUE}}}$",
                            },
                        },
                        "style": "form",
                        "explode": True,
                    },
                    {
                        "name": "presence",
                        "in": "query",
                        "description": "online or offline; empty: both.",
                        "schema": {"type": "string", "enum": ["", "online", "offline"]},
                    },
                    {
                        "name": "q",
                        "in": "query",
                        "description": "Only ids starting with this.",
                        "schema": {"type": "string", "maxLength": MAX_LEVEL_LENGTH},
                    },
                    *_PAGE_QUERY,
                ],
                "responses": {
                    "200": {"description": "A page of things.", "content": _json(_ref("ListThingsResponse"))},
                    **_responses(*_READ_ERRORS),
                },
            },
            "post": {
                "tags": ["things"],
                "operationId": "createThing",
                "summary": "Register a thing; the answer carries its credentials, shown once (admin)",
                "requestBody": {"required": True, "content": _json(_ref("CreateThingRequest"))},
                "responses": {
                    "201": {
                        "description": "Registered.",
                        "headers": {"Location": {"description": "/api/v1/things/{thingId}", "schema": {"type": "string"}}},
                        "content": _json(_ref("CreateThingResponse")),
                    },
                    **_responses(*_AUTH_ERRORS, "409:Conflict"),
                },
            },
        },
        "/api/v1/things/{thingId}": {
            "get": {
                "tags": ["things"],
                "operationId": "getThing",
                "summary": "One thing with its presence (viewer)",
                "parameters": [_THING_ID],
                "responses": {
                    "200": {"description": "The thing.", "content": thing},
                    **_responses(*_READ_ERRORS, "404:NotFound"),
                },
            },
            "delete": {
                "tags": ["things"],
                "operationId": "deleteThing",
                "summary": "Unregister a thing and end its connection; its executions stay (admin)",
                "parameters": [_THING_ID],
                "responses": {**deleted, **_responses(*_AUTH_ERRORS, "404:NotFound")},
            },
        },
        "/api/v1/things/{thingId}/credentials": {
            "post": {
                "tags": ["things"],
                "operationId": "rotateCredentials",
                "summary": "New credentials; the old ones stop working and the connection ends (admin)",
                "parameters": [_THING_ID],
                "responses": {
                    "200": {"description": "The new credentials, shown once.", "content": _json(_ref("Credentials"))},
                    **_responses(*_AUTH_ERRORS, "404:NotFound"),
                },
            }
        },
        "/api/v1/thing-types": {
            "get": {
                "tags": ["thing-types"],
                "operationId": "listThingTypes",
                "summary": "List thing types sorted by name (viewer)",
                "parameters": _PAGE_QUERY,
                "responses": {
                    "200": {"description": "A page of thing types.", "content": _json(_ref("ListThingTypesResponse"))},
                    **_responses(*_READ_ERRORS),
                },
            }
        },
        "/api/v1/thing-types/{name}": {
            "get": {
                "tags": ["thing-types"],
                "operationId": "getThingType",
                "summary": "One thing type with its commands and their schemas (viewer)",
                "parameters": [_TYPE_NAME],
                "responses": {
                    "200": {"description": "The thing type.", "content": _json(_ref("ThingType"))},
                    **_responses(*_READ_ERRORS, "404:NotFound"),
                },
            },
            "put": {
                "tags": ["thing-types"],
                "operationId": "putThingType",
                "summary": "Create or replace a thing type; every schema is checked first (admin)",
                "parameters": [_TYPE_NAME],
                "requestBody": {"required": False, "content": _json(_ref("PutThingTypeRequest"))},
                "responses": {
                    "200": {"description": "The stored thing type.", "content": _json(_ref("ThingType"))},
                    **_responses(*_AUTH_ERRORS),
                },
            },
            "delete": {
                "tags": ["thing-types"],
                "operationId": "deleteThingType",
                "summary": "Delete a thing type no thing uses (admin)",
                "parameters": [_TYPE_NAME],
                "responses": {**deleted, **_responses(*_AUTH_ERRORS, "404:NotFound", "409:Conflict")},
            },
        },
    }


def _events_path() -> dict[str, Any]:
    sequence = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    event = {
        "type": "object",
        "properties": {
            "id": {"type": "string", "description": "The event's sequence (execution and job events)."},
            "event": {"type": "string", "enum": ["execution", "job", "error"]},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"anyOf": [_ref("ExecutionEvent"), _ref("JobEvent"), _ref("Error")]},
            },
        },
    }
    return {
        "get": {
            "tags": ["events"],
            "operationId": "streamEvents",
            "summary": "Live execution and job events as Server-Sent Events, resumable with Last-Event-ID (viewer)",
            "description": "The same filters, order, resume and cut-off rules as gRPC Stream. Each event: `id: <sequence>`, "
            "`event: execution`, `data: <ExecutionEvent>` or, when a job's state or counts changed, `event: job`, "
            "`data: <JobEvent>` (sent only to a stream without a thingId, executionId or action filter); "
            "`: keepalive` comments every 15 s. Resume after the "
            "last sequence received with the Last-Event-ID header (or `after`): no gap, no duplicate; without either "
            "the stream starts live. A client further behind than the server's stream_buffer events, or a service "
            "stopping, ends the stream with one `event: error` (data: Error, RESOURCE_EXHAUSTED or UNAVAILABLE): "
            "reconnect with Last-Event-ID.",
            "parameters": [
                {"name": "thingId", "in": "query", "schema": {"type": "string"}},
                {"name": "executionId", "in": "query", "schema": {"type": "string"}},
                {"name": "action", "in": "query", "schema": {"type": "string"}},
                {
                    "name": "jobId",
                    "in": "query",
                    "description": "Only this job's events and its executions' events (empty: any job; a malformed id: 400).",
                    "schema": {"anyOf": [{"type": "string", "maxLength": 0}, _LEVEL]},
                },
                {
                    "name": "after",
                    "in": "query",
                    "description": "Replay the events after this sequence, then go on live (Last-Event-ID wins).",
                    "schema": sequence,
                },
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "description": "The sequence of the last event received (what an EventSource sends).",
                    "schema": sequence,
                },
            ],
            "responses": {
                "200": {"description": "The event stream.", "content": {"text/event-stream": {"schema": event}}},
                **_responses(*_READ_ERRORS, "409:Conflict"),
            },
        }
    }


# ---- the external broker's authn/authz (EMQX HTTP format), served by server.api.http_broker_auth ----------


def _broker_schemas() -> dict[str, Any]:
    def text(description: str, *, nullable: bool = False) -> dict[str, Any]:
        kind: Any = ["string", "null"] if nullable else "string"
        return {"type": kind, "maxLength": http_broker_auth.MAX_FIELD_LENGTH, "description": description}

    # EMQX may send more fields than its body template names: they are ignored, so not refused.
    return {
        "BrokerAuthnRequest": {
            "type": "object",
            "description": "EMQX's HTTP authenticator body template: "
            '{clientid = "${clientid}", username = "${username}", password = "${password}"}.',
            "required": ["clientid"],
            "properties": {
                "clientid": text("The MQTT client id (a thing's id; any id for a Kaa device)."),
                "username": text("The CONNECT username (a thing's id); empty or null: none.", nullable=True),
                "password": text("The CONNECT password (the thing's password); empty or null: none.", nullable=True),
            },
        },
        "BrokerAuthzRequest": {
            "type": "object",
            "description": "EMQX's HTTP authorizer body template: "
            '{clientid = "${clientid}", username = "${username}", action = "${action}", topic = "${topic}"}.',
            "required": ["clientid", "action", "topic"],
            "properties": {
                "clientid": text("The MQTT client id."),
                "username": text("The client's username; empty or null: none (a Kaa device).", nullable=True),
                "action": {"type": "string", "enum": list(http_broker_auth.ACTIONS)},
                "topic": text("The topic published to, or the filter subscribed with."),
            },
        },
        "BrokerDecision": {
            "type": "object",
            "description": "Read by EMQX: allow or deny decides (fleetcmd never answers EMQX's third value, ignore; "
            "EMQX reads any status other than 200 as ignore and asks its next authenticator or authorizer).",
            "required": ["result", "is_superuser"],
            "properties": {
                "result": {"type": "string", "enum": ["allow", "deny"]},
                "is_superuser": {
                    "type": "boolean",
                    "description": "true only for the service's own broker account (authn): it may use every topic.",
                },
            },
        },
    }


def _broker_paths() -> dict[str, Any]:
    def post(operation_id: str, summary: str, description: str, body: str) -> dict[str, Any]:
        return {
            "post": {
                "tags": ["broker"],
                "operationId": operation_id,
                "summary": summary,
                "description": description + " Served only when FLEETCMD_BROKER_AUTH_SECRET is set (404 otherwise).",
                "security": [{"brokerSecret": []}],
                "requestBody": {"required": True, "content": _json(_ref(body))},
                "responses": {
                    "200": {"description": "The decision.", "content": _json(_ref("BrokerDecision"))},
                    "400": {"$ref": "#/components/responses/BadRequest"},
                    "401": _error(
                        f"No {http_broker_auth.SECRET_HEADER} header, or not the secret (code UNAUTHENTICATED): no "
                        "decision, which EMQX reads as ignore."
                    ),
                    "413": {"$ref": "#/components/responses/PayloadTooLarge"},
                },
            }
        }

    return {
        http_broker_auth.AUTHN_PATH: post(
            "brokerAuthn",
            "EMQX HTTP authentication: may this CONNECT in? (the broker's shared secret)",
            "The embedded broker's rule: a registered thing with client id = username = thing id and its current "
            "password; a Kaa device with no username and no password while Kaa endpoints exist (unless its client id "
            "is a thing's); the service's own broker account as a superuser (its username is reserved).",
            "BrokerAuthnRequest",
        ),
        http_broker_auth.AUTHZ_PATH: post(
            "brokerAuthz",
            "EMQX HTTP authorization: may this client publish to / subscribe with this topic? (the broker's shared secret)",
            "The embedded broker's topic ACL: a thing subscribes to its own request topics and publishes its own "
            "responses; a Kaa device uses the cex/dcx topics of registered endpoints whose token it names; the "
            "service's account may use every topic.",
            "BrokerAuthzRequest",
        ),
    }


# ---- jobs (issue 16): /api/v1/jobs, served by server.api.http_jobs -------------------------------


def _job_schemas() -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0, "maximum": UINT32_MAX}
    number = {"type": "number"}
    pct = {"type": "number", "minimum": 0, "maximum": 100}

    def or_null(schema: dict[str, Any]) -> dict[str, Any]:
        # An optional member may be null (as if absent), as in the commands API.
        types = schema["type"] if isinstance(schema.get("type"), list) else [schema.get("type")]
        if None in types or "null" in types:
            return schema
        out = {**schema, "type": [*types, "null"]}
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return out

    def obj(properties: dict[str, Any], required: tuple[str, ...] = (), nullable: bool = False) -> dict[str, Any]:
        members = {name: p if name in required else or_null(p) for name, p in properties.items()}
        return {"type": ["object", "null"] if nullable else "object", "properties": members, "required": list(required)}

    def enum(kind: Any) -> dict[str, Any]:
        return {"type": "string", "enum": [m.name for m in kind]}

    ids = {"type": "array", "items": _LEVEL, "maxItems": jobs.MAX_TARGET_IDS}
    # Unset: absent, null or "".
    time = {"anyOf": [_NULLABLE_TIME, {"type": "string", "maxLength": 0}]}
    failure = enum(jobs.FailureType)
    job = {
        "jobId": {"type": "string"},
        "state": _ref("JobState"),
        "spec": _ref("JobSpec"),
        "counts": {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "description": "Targets by the status of their latest execution, plus PENDING (not started), "
            "RETRYING (waiting for a retry's backoff), SKIPPED (never started: the job ended first).",
        },
        "targetsTotal": {"type": "integer"},
        "createdAt": _TIME,
        "startedAt": _NULLABLE_TIME,
        "endedAt": _NULLABLE_TIME,
        "abortReason": {"type": ["string", "null"]},
        "createdBy": {"type": ["string", "null"], "description": "The API key id that created it."},
    }
    job_rest = ("counts", "targetsTotal", "createdAt", "startedAt", "endedAt", "abortReason", "createdBy")
    return {
        "JobState": {**enum(jobs.JobState), "description": "COMPLETED, CANCELED and ABORTED are final."},
        "JobSpec": obj(
            {
                "action": {"type": "string", "minLength": 1, "maxLength": MAX_ACTION_LENGTH},
                "params": {"type": ["object", "null"], "description": "At most 64 KiB as JSON (max_params_bytes)."},
                "ttl": {**count, "description": "Seconds each execution has; 0: the action's or the server's default."},
                "targets": obj(
                    {
                        "thingIds": ids,
                        "thingType": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{0,128}$"},
                        "attributes": {
                            "type": "object",
                            "additionalProperties": {"type": "string", "maxLength": MAX_ATTRIBUTE_VALUE},
                            "maxProperties": jobs.MAX_SELECTOR_ATTRIBUTES,
                            "propertyNames": {"minLength": 1, "maxLength": MAX_ATTRIBUTE_KEY},
                        },
                        "onlineOnly": {"type": "boolean"},
                        "exclude": ids,
                        "mode": enum(jobs.TargetMode),
                        "fromJob": {
                            "type": ["string", "null"],
                            "readOnly": True,
                            "description": "Set by rerun-failed: the job whose targets ended in fromStatuses.",
                        },
                        "fromStatuses": {"type": "array", "items": _ref("ExecutionStatus"), "readOnly": True},
                    },
                )
                | {
                    "description": "Every given selector must match; at least one of thingIds, thingType, attributes.",
                    "anyOf": [
                        {"required": ["thingIds"], "properties": {"thingIds": {"minItems": 1}}},
                        {"required": ["thingType"], "properties": {"thingType": {"minLength": 1}}},
                        {"required": ["attributes"], "properties": {"attributes": {"minProperties": 1}}},
                    ],
                },
                "rollout": obj(
                    {
                        "maxPerMinute": {**count, "maximum": jobs.MAX_PER_MINUTE, "description": "0: unpaced."},
                        "ramp": obj(
                            {
                                "basePerMinute": {**count, "minimum": 1, "maximum": jobs.MAX_PER_MINUTE},
                                "factor": {**number, "exclusiveMinimum": 1, "maximum": jobs.MAX_RAMP_FACTOR},
                                "everyNotified": count,
                                "everySucceeded": count,
                            },
                            ("basePerMinute", "factor"),
                            nullable=True,
                        )
                        | {
                            "description": "Exactly one of everyNotified and everySucceeded is above 0.",
                            "oneOf": [
                                {"type": "null"},
                                {
                                    "type": "object",
                                    "required": ["everyNotified"],
                                    "properties": {"everyNotified": {"minimum": 1}},
                                },
                                {
                                    "type": "object",
                                    "required": ["everySucceeded"],
                                    "properties": {"everySucceeded": {"minimum": 1}},
                                },
                            ],
                        },
                        "maxInFlight": {**count, "maximum": jobs.MAX_IN_FLIGHT, "description": "0: no limit."},
                        "sequentialPerThing": {"type": "boolean"},
                    },
                ),
                "abort": {
                    "type": "array",
                    "maxItems": jobs.MAX_ABORT_CRITERIA,
                    "items": obj(
                        {
                            "failure": failure,
                            "thresholdPct": {**pct, "exclusiveMinimum": 0},
                            "minFinished": {**count, "minimum": 1},
                        },
                        ("failure", "thresholdPct", "minFinished"),
                    ),
                },
                "canary": obj({"count": {**count, "minimum": 1}, "successPct": pct}, ("count",), nullable=True),
                "retries": {
                    "type": "array",
                    "maxItems": jobs.MAX_RETRY_POLICIES,
                    "items": obj(
                        {
                            "failure": failure,
                            "maxAttempts": {**count, "maximum": jobs.MAX_RETRY_ATTEMPTS},
                            "backoff": {"type": "string", "enum": ["FIXED", "EXPONENTIAL"]},
                            "baseSeconds": {**number, "minimum": 0, "maximum": jobs.MAX_BACKOFF_SECONDS},
                            "maxSeconds": {**number, "minimum": 0, "maximum": jobs.MAX_BACKOFF_SECONDS},
                            "jitter": {"type": "boolean"},
                        },
                        ("failure",),
                    ),
                },
                "schedule": obj(
                    {"startAt": time, "endAt": time, "endBehavior": enum(jobs.EndBehavior)},
                ),
                "strict": {"type": "boolean"},
                "description": {"type": "string", "maxLength": jobs.MAX_DESCRIPTION},
                "idempotencyKey": {"type": ["string", "null"], "maxLength": jobs.MAX_IDEMPOTENCY_KEY},
            },
            ("action", "targets"),
        ),
        "CreateJobRequest": {
            "allOf": [
                _ref("JobSpec"),
                obj({"dryRun": {"type": "boolean", "description": "Only count the targets (200); nothing is created."}}),
            ]
        },
        "DryRun": obj(
            {"targetsTotal": {"type": "integer"}, "sample": {"type": "array", "items": {"type": "string"}}},
            ("targetsTotal", "sample"),
        ),
        "Job": obj(job, ("jobId", "state", "spec", *job_rest)),
        # A job event's job: only the job's first event has the spec (it never changes).
        "JobOfEvent": {
            **obj(job, ("jobId", "state", *job_rest)),
            "description": "A job as GET /api/v1/jobs/{jobId} shows it; `spec` only in the job's first event "
            "(the one of its creation): a watcher that first sees a job mid-way and needs its spec calls "
            "GET /api/v1/jobs/{jobId}.",
        },
        "ListJobsResponse": obj(
            {"jobs": {"type": "array", "items": _ref("Job")}, "nextPageToken": {"type": "string"}},
            ("jobs", "nextPageToken"),
        ),
        "CancelJobRequest": obj({"onlyUndelivered": {"type": ["boolean", "null"]}}),
        "RerunFailedRequest": obj(
            {
                "statuses": {
                    "type": ["array", "null"],
                    "items": {"type": "string", "enum": [s.name for s in Status if s.final]},
                    "description": "Default FAILED, REJECTED, TIMED_OUT.",
                }
            }
        ),
    }


def _job_paths() -> dict[str, Any]:
    job_id = {"name": "jobId", "in": "path", "required": True, "schema": _LEVEL}
    job = {"description": "The job.", "content": _json(_ref("Job"))}
    created = {
        "description": "The job created.",
        "headers": {"Location": {"description": "/api/v1/jobs/{jobId}", "schema": {"type": "string"}}},
        "content": _json(_ref("Job")),
    }
    read_errors = _responses("400:BadRequest", "401:Unauthorized", "403:Forbidden", "404:NotFound", "503:Unavailable")

    def control(operation_id: str, summary: str, body: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tags": ["jobs"],
            "operationId": operation_id,
            "summary": summary,
            "parameters": [job_id],
            "responses": {"200": job, **_responses(*_AUTH_ERRORS, "404:NotFound", "409:Conflict")},
        }
        if body:
            out["requestBody"] = {"required": False, "content": _json(_ref(body))}
        return out

    return {
        "/api/v1/jobs": {
            "post": {
                "tags": ["jobs"],
                "operationId": "createJob",
                "summary": "Create a job, or with dryRun count its targets (operator)",
                "requestBody": {"required": True, "content": _json(_ref("CreateJobRequest"))},
                "responses": {
                    "200": {"description": "dryRun: the targets it would have now.", "content": _json(_ref("DryRun"))},
                    "201": created,
                    **_responses(*_AUTH_ERRORS, "404:NotFound", "409:Conflict", "429:TooManyRequests"),
                },
            },
            "get": {
                "tags": ["jobs"],
                "operationId": "listJobs",
                "summary": "List jobs, newest first (viewer)",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "description": "Repeatable, or comma-separated: JobState names in any case.",
                        "schema": {"type": "array", "items": {"type": "string", "pattern": _JOB_STATE_LIST}},
                        "style": "form",
                        "explode": True,
                    },
                    {
                        "name": "pageSize",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": job_runner.MAX_PAGE_SIZE},
                    },
                    {"name": "pageToken", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "A page of jobs.", "content": _json(_ref("ListJobsResponse"))},
                    **_responses("400:BadRequest", "401:Unauthorized", "403:Forbidden", "503:Unavailable"),
                },
            },
        },
        "/api/v1/jobs/{jobId}": {
            "get": {
                "tags": ["jobs"],
                "operationId": "getJob",
                "summary": "One job with its counts (viewer)",
                "parameters": [job_id],
                "responses": {"200": job, **read_errors},
            }
        },
        "/api/v1/jobs/{jobId}/pause": {"post": control("pauseJob", "Start nothing new until resumed (operator)")},
        "/api/v1/jobs/{jobId}/resume": {"post": control("resumeJob", "Continue a paused job (operator)")},
        "/api/v1/jobs/{jobId}/cancel": {
            "post": control("cancelJob", "End the job; not-final executions become CANCELED (operator)", "CancelJobRequest")
        },
        "/api/v1/jobs/{jobId}/rerun-failed": {
            "post": {
                **control(
                    "rerunFailedJob", "A new job over the targets that ended in the statuses (operator)", "RerunFailedRequest"
                ),
                "responses": {"201": created, **_responses(*_AUTH_ERRORS, "404:NotFound", "409:Conflict")},
            }
        },
    }


def document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fleetcmd HTTP API",
            "version": version,
            "description": "EMQX-style command REST API (camelCase JSON, RFC 3339 UTC times with milliseconds) "
            "and Kaa KP1 HTTP polling. REST calls need an API key (Authorization: Bearer fck_...) with the same "
            "roles as gRPC: viewer reads, operator also sends, cancels and re-runs.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerAuth": []}],
        "tags": [
            {"name": "commands"},
            {"name": "things"},
            {"name": "thing-types"},
            {"name": "events"},
            {"name": "jobs"},
            {"name": "kaa"},
            {"name": "broker"},
            {"name": "meta"},
        ],
        "paths": {
            "/api/v1/commands": {
                "post": {
                    "tags": ["commands"],
                    "operationId": "sendCommand",
                    "summary": "Send a command to a thing (operator)",
                    "parameters": [_WAIT_QUERY],
                    "requestBody": {"required": True, "content": _json(_ref("SendRequest"))},
                    "responses": {
                        **_SENT_OR_ACCEPTED,
                        **_responses(*_AUTH_ERRORS, "404:NotFound", "409:Conflict", "429:TooManyRequests"),
                    },
                },
                "get": {
                    "tags": ["commands"],
                    "operationId": "listCommands",
                    "summary": "List executions, newest first (viewer)",
                    "parameters": [
                        {"name": "thingId", "in": "query", "schema": {"type": "string"}},
                        {"name": "action", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "jobId",
                            "in": "query",
                            "description": "Only this job's executions.",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "status",
                            "in": "query",
                            "description": (
                                "Repeatable, or comma-separated (status=SENT,QUEUED): ExecutionStatus names in any case;"
                                " empty items are ignored, an unknown name is a 400."
                            ),
                            "schema": {"type": "array", "items": {"type": "string", "pattern": _STATUS_LIST}},
                            "style": "form",
                            "explode": True,
                        },
                        {"name": "createdAfter", "in": "query", "description": "Inclusive.", "schema": _TIME_FILTER},
                        {"name": "createdBefore", "in": "query", "description": "Exclusive.", "schema": _TIME_FILTER},
                        {
                            "name": "pageSize",
                            "in": "query",
                            "description": "Default 50.",
                            "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
                        },
                        {
                            "name": "pageToken",
                            "in": "query",
                            "description": "nextPageToken of the previous page (with the same filters).",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {"description": "A page of executions.", "content": _json(_ref("ListResponse"))},
                        **_responses("400:BadRequest", "401:Unauthorized", "403:Forbidden", "503:Unavailable"),
                    },
                },
            },
            "/api/v1/commands/{executionId}": {
                "get": {
                    "tags": ["commands"],
                    "operationId": "getCommand",
                    "summary": "One execution with its history and re-runs (viewer)",
                    "parameters": [_EXECUTION_ID],
                    "responses": {
                        "200": {"description": "The execution.", "content": _json(_ref("Execution"))},
                        **_responses("400:BadRequest", "401:Unauthorized", "403:Forbidden", "404:NotFound", "503:Unavailable"),
                    },
                }
            },
            "/api/v1/commands/{executionId}/cancel": {
                "post": {
                    "tags": ["commands"],
                    "operationId": "cancelCommand",
                    "summary": "Cancel a non-final execution (operator)",
                    "parameters": [_EXECUTION_ID],
                    "responses": {
                        "200": {"description": "The canceled execution.", "content": _json(_ref("Execution"))},
                        **_responses(*_AUTH_ERRORS, "404:NotFound", "409:Conflict"),
                    },
                }
            },
            "/api/v1/commands/{executionId}/rerun": {
                "post": {
                    "tags": ["commands"],
                    "operationId": "rerunCommand",
                    "summary": "A new execution with the same thing, action, params and TTL, linked to the original (operator)",
                    "parameters": [_EXECUTION_ID, _WAIT_QUERY],
                    "requestBody": {"required": False, "content": _json(_ref("RerunRequest"))},
                    "responses": {
                        **_SENT_OR_ACCEPTED,
                        **_responses(*_AUTH_ERRORS, "404:NotFound", "429:TooManyRequests"),
                    },
                }
            },
            **_registry_paths(),
            "/api/v1/events": _events_path(),
            "/api/v1/openapi.json": {
                "get": {
                    "tags": ["meta"],
                    "operationId": "getOpenApi",
                    "summary": "This document (no key needed)",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1.", "content": _json({"type": "object"})}},
                }
            },
            "/metrics": {
                "get": {
                    "tags": ["meta"],
                    "operationId": "getMetrics",
                    "summary": "Service counters in the Prometheus text format (any API key)",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition 0.0.4.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_responses("401:Unauthorized"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "tags": ["meta"],
                    "operationId": "getHealthz",
                    "summary": "Liveness: the process serves HTTP (no key needed)",
                    "security": [],
                    "responses": {"200": {"description": "Alive.", "content": _json({"type": "object"})}},
                }
            },
            "/readyz": {
                "get": {
                    "tags": ["meta"],
                    "operationId": "getReadyz",
                    "summary": "Readiness: store writable, broker listening, gRPC serving (no key needed)",
                    "security": [],
                    "responses": {
                        "200": {"description": "Ready.", "content": _json({"type": "object"})},
                        "503": {
                            "description": "Not ready: `failing` names each failing part (store, broker, grpc) and why.",
                            "content": _json(
                                {
                                    "type": "object",
                                    "properties": {
                                        "status": {"type": "string"},
                                        "failing": {"type": "object", "additionalProperties": {"type": "string"}},
                                    },
                                }
                            ),
                        },
                    },
                }
            },
            **_job_paths(),
            "/kp1/{appVersion}/cex/{token}/command/{commandType}": _kaa_path("command"),
            "/kp1/{appVersion}/cex/{token}/result/{commandType}": _kaa_path("result"),
            **_broker_paths(),
        },
        "components": {
            "schemas": {**_schemas(), **_job_schemas(), **_broker_schemas()},
            "responses": _responses_component(),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "A fleetcmd API key (fck_...)."},
                "brokerSecret": {
                    "type": "apiKey",
                    "in": "header",
                    "name": http_broker_auth.SECRET_HEADER,
                    "description": "The external broker's shared secret (FLEETCMD_BROKER_AUTH_SECRET).",
                },
            },
        },
    }
