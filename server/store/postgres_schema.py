"""The PostgreSQL schema of :mod:`server.store.postgres`, its versioned migrations, and the row <-> model conversions.

Migrations are numbered like SQLite's ``PRAGMA user_version`` (:data:`server.store.sqlite_schema.SCHEMA_VERSION`):
schema version N holds the same tables and columns on both stores. PostgreSQL starts at version 3
(the first version it exists at, so versions 1 and 2 are folded into it); version 4 adds the jobs. A
later version adds one entry to :data:`MIGRATIONS` here and its ``ALTER TABLE`` in SQLite's list. The applied version is
the row of ``schema_version``; :func:`migrate` runs the missing steps in one transaction under an
advisory lock, so replicas starting together migrate once.

Besides the shared model, PostgreSQL keeps what several writers need: the event counter row
(``event_counter``: sequence numbers are taken from it inside the committing transaction), the
outbox leases (``lease_owner``, ``lease_until``, ``lease_epoch`` on ``executions``), the job lock's owner
(``jobs.lock_owner``), the partial indexes of the TTL sweep, of the outbox and of the job adoption query, and a
trigger that refuses any status change that goes backwards or leaves a final status, whoever writes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import asyncpg

from server.core.errors import FleetcmdError
from server.core.lifecycle import Status
from server.core.models import (
    Execution,
    StateChange,
    job_event,
    job_event_json,
    job_event_parts,
    job_event_reads_job,
    job_from_event,
)
from server.store.rows import (
    reason_columns,
    reason_from_columns,
    violations_column,
)

# Final statuses are the highest ones (Status.final): "status < FIRST_FINAL" is "not final" in SQL.
FIRST_FINAL = int(Status.SUCCEEDED)
assert all(s.final == (s >= FIRST_FINAL) for s in Status)
# QUEUED and SENT: the device has not acknowledged the request, it belongs to the outbox.
LAST_UNACKED = int(Status.SENT)

_V3 = f"""
CREATE TABLE executions (
    idx                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id       TEXT NOT NULL UNIQUE,
    command_id         TEXT NOT NULL,
    thing_id           TEXT NOT NULL,
    action             TEXT NOT NULL,
    params             TEXT,
    ttl_seconds        BIGINT NOT NULL,
    status             SMALLINT NOT NULL,
    result             TEXT,
    reason_code        TEXT,
    reason_description TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL,
    completed_at       BIGINT,
    expires_at         BIGINT NOT NULL,
    idempotency_key    TEXT,
    fingerprint        TEXT,
    thing_type         TEXT,
    result_violations  TEXT,
    kaa_id             BIGINT,
    rerun_of           TEXT,
    -- The outbox lease: which replica may publish the request, until when, and the how-manieth claim.
    lease_owner        TEXT,
    lease_until        BIGINT,
    lease_epoch        INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX executions_idempotency ON executions(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX executions_thing ON executions(thing_id, idx);
CREATE INDEX executions_action ON executions(action, idx);
CREATE INDEX executions_status ON executions(status, idx);
-- Unique: two replicas giving out the same Kaa id both reach the commit; the second fails and retries.
CREATE UNIQUE INDEX executions_kaa ON executions(thing_id, action, kaa_id) WHERE kaa_id IS NOT NULL;
CREATE INDEX executions_rerun ON executions(rerun_of) WHERE rerun_of IS NOT NULL;
CREATE INDEX executions_completed ON executions(completed_at) WHERE completed_at IS NOT NULL;
-- The TTL sweep: non-final executions by deadline (a final one leaves the index).
CREATE INDEX executions_deadline ON executions(expires_at) WHERE status < {FIRST_FINAL};
-- The outbox: requests no device has acknowledged, unleased or by lease end, in creation order.
CREATE INDEX executions_unacked ON executions(lease_until, idx) WHERE status <= {LAST_UNACKED};
CREATE TABLE events (
    seq                BIGINT PRIMARY KEY,
    execution_id       TEXT NOT NULL,
    thing_id           TEXT NOT NULL,
    action             TEXT NOT NULL,
    status             SMALLINT NOT NULL,
    previous_status    SMALLINT,
    at                 BIGINT NOT NULL,
    late               BOOLEAN NOT NULL DEFAULT FALSE,
    result             TEXT,
    reason_code        TEXT,
    reason_description TEXT,
    note               TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_execution ON events(execution_id, seq);
-- One row: the last event sequence given out. Locked by the UPDATE that takes a batch's numbers,
-- held to that batch's commit: commits take their numbers in commit order.
CREATE TABLE event_counter (
    id       BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    last_seq BIGINT NOT NULL
);
INSERT INTO event_counter (last_seq) VALUES (0);
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE things (
    thing_id               TEXT PRIMARY KEY,
    thing_type             TEXT NOT NULL DEFAULT '',
    attributes             TEXT NOT NULL DEFAULT '{{}}',
    token_hash             TEXT NOT NULL,
    created_at             BIGINT NOT NULL,
    updated_at             BIGINT NOT NULL,
    credentials_rotated_at BIGINT NOT NULL,
    last_seen              BIGINT,
    last_client_id         TEXT NOT NULL DEFAULT '',
    last_remote_address    TEXT NOT NULL DEFAULT '',
    last_connected_at      BIGINT,
    kaa_app_version        TEXT NOT NULL DEFAULT '',
    kaa_token_hash         TEXT
);
CREATE INDEX things_type ON things(thing_type);
CREATE UNIQUE INDEX things_kaa_token ON things(kaa_token_hash) WHERE kaa_token_hash IS NOT NULL;
CREATE TABLE thing_types (
    name        TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
-- Whoever writes (a replica with a bug, an operator's psql): a status never goes backwards and a
-- final status never changes. The store's own guard is the row lock and decide(); this is the backstop.
CREATE FUNCTION executions_status_forward() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status < OLD.status OR (OLD.status >= {FIRST_FINAL} AND NEW.status <> OLD.status) THEN
        RAISE EXCEPTION 'execution %: status % cannot follow %', OLD.execution_id, NEW.status, OLD.status
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER executions_status_forward BEFORE UPDATE OF status ON executions
    FOR EACH ROW EXECUTE FUNCTION executions_status_forward();
"""

# Jobs (issue 16; server/store/postgres_jobs.py), as SQLite's schema 4: the job columns of an
# execution, one execution per (job, thing, attempt) enforced by a unique index, the jobs and their targets.
_V4 = """
ALTER TABLE executions ADD COLUMN job_id TEXT, ADD COLUMN retry_of TEXT, ADD COLUMN job_attempt INTEGER;
CREATE UNIQUE INDEX executions_job_attempt ON executions(job_id, thing_id, job_attempt) WHERE job_id IS NOT NULL;
CREATE INDEX executions_job ON executions(job_id, idx) WHERE job_id IS NOT NULL;
CREATE TABLE jobs (
    idx             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          TEXT NOT NULL UNIQUE,
    spec            TEXT NOT NULL,
    state           SMALLINT NOT NULL,
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    ended_at        BIGINT,
    abort_reason    TEXT NOT NULL DEFAULT '',
    created_by      TEXT NOT NULL DEFAULT '',
    targets_total   BIGINT NOT NULL DEFAULT 0,
    resolved        BOOLEAN NOT NULL DEFAULT FALSE,
    resolve_cursor  TEXT NOT NULL DEFAULT '',
    counts          TEXT,
    idempotency_key TEXT,
    fingerprint     TEXT NOT NULL DEFAULT '',
    sequential      BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_state ON jobs(state, idx);
-- One row per (job, thing): its order, its latest attempt and what became of it (TargetState).
CREATE TABLE job_targets (
    job_id        TEXT NOT NULL,
    thing_id      TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    state         SMALLINT NOT NULL,
    attempt       INTEGER NOT NULL DEFAULT 0,
    execution_id  TEXT,
    status        SMALLINT,
    due_at        BIGINT,
    dispatched_at BIGINT,
    reason        TEXT,
    PRIMARY KEY (job_id, thing_id)
);
CREATE INDEX job_targets_state ON job_targets(job_id, state, seq);
CREATE INDEX job_targets_due ON job_targets(job_id, due_at) WHERE state = 3;
CREATE INDEX job_targets_thing ON job_targets(thing_id) WHERE state = 1;
"""

# As SQLite's schema 5: the password in mosquitto's password_file format (broker-config --mosquitto;
# '' for things whose credentials were issued before it), and whether the external broker acknowledged
# a request's publish (server/core/handover.py; the outbox claim skips it by its lease_until).
_V5 = """
ALTER TABLE things ADD COLUMN broker_password_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE executions ADD COLUMN handed BOOLEAN NOT NULL DEFAULT FALSE;
"""

# As SQLite's schema 6: job events (server/core/job_runner.py). An event carries its job's id (a job's
# events and its executions' events, for a Stream that filters by job) and, for a job event, the changing
# parts of the job (models.job_event_json; NULL for an execution's event); a CANCELED job's cancel that
# spared the delivered executions is kept, so a restart or an adopting replica cancels again alike.
_V6 = """
ALTER TABLE events ADD COLUMN job_id TEXT, ADD COLUMN job TEXT;
CREATE INDEX events_job ON events(job_id, seq) WHERE job_id IS NOT NULL;
ALTER TABLE jobs ADD COLUMN only_undelivered BOOLEAN NOT NULL DEFAULT FALSE;
"""

# Schema 7 (SQLite: the version only; one process, no replicas). Jobs on several replicas (server/store/postgres_jobs.py):
# the token of the lock connection of the replica that last took a job's lock, which a dispatch checks under the job's
# row lock (a replica that lost the lock commits no dispatch after another took the job over); and the adoption query's
# partial index (the unfinished or unsettled jobs by age; its predicate is that of the query, word for word).
_V7 = """
ALTER TABLE jobs ADD COLUMN lock_owner TEXT;
CREATE INDEX jobs_unsettled ON jobs(idx) WHERE state IN (1, 2, 3) OR counts IS NULL;
"""

# Schema version -> the statements that bring the previous version to it (see the module docstring).
MIGRATIONS: dict[int, str] = {3: _V3, 4: _V4, 5: _V5, 6: _V6, 7: _V7}
SCHEMA_VERSION = max(MIGRATIONS)

# Any number: the key of the advisory lock replicas take to migrate one at a time.
_MIGRATION_LOCK = 0x666C6565  # "flee"


async def migrate(conn: asyncpg.Connection) -> int:
    """Create the schema or bring it up to :data:`SCHEMA_VERSION`; returns the version found (0: new database).

    Raises:
        FleetcmdError: the database has a newer schema than this fleetcmd.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_at TIMESTAMPTZ)")
        found = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        if found > SCHEMA_VERSION:
            raise FleetcmdError(f"the database has schema {found}, newer than this fleetcmd ({SCHEMA_VERSION})")
        for version in sorted(MIGRATIONS):
            if version > found:
                await conn.execute(MIGRATIONS[version])
        if found < SCHEMA_VERSION:
            # One row per upgrade, the version it reached (a new database: one row).
            await conn.execute("INSERT INTO schema_version (version, applied_at) VALUES ($1, now())", SCHEMA_VERSION)
        return int(found)


EXEC_COLUMNS = (
    "idx, execution_id, command_id, thing_id, action, params, ttl_seconds, status, result, "
    "reason_code, reason_description, created_at, updated_at, completed_at, expires_at, idempotency_key, "
    "thing_type, result_violations, kaa_id, rerun_of, job_id, retry_of, job_attempt"
)
EVENT_COLUMNS = (
    "seq, execution_id, thing_id, action, status, previous_status, at, late, result, reason_code, reason_description, note,"
    " job_id, job"
)

SELECT_LOCKED = f"SELECT {EXEC_COLUMNS} FROM executions WHERE execution_id = ANY($1::text[]) ORDER BY execution_id FOR UPDATE"
SELECT_BY_KEYS = f"SELECT {EXEC_COLUMNS}, fingerprint FROM executions WHERE idempotency_key = ANY($1::text[])"
SELECT_MAX_KAA = "SELECT COALESCE(MAX(kaa_id), 0) FROM executions WHERE thing_id = $1 AND action = $2 AND kaa_id IS NOT NULL"
INSERT_EXECUTION = (
    "INSERT INTO executions (execution_id, command_id, thing_id, action, params, ttl_seconds, status, result,"
    " reason_code, reason_description, created_at, updated_at, completed_at, expires_at, idempotency_key,"
    " fingerprint, thing_type, result_violations, kaa_id, rerun_of, lease_owner, lease_until, lease_epoch,"
    " job_id, retry_of, job_attempt)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22,$23,$24,$25,$26)"
)
# The guarded update: a row changes only from the status its decision was made against (arrays of
# one element per execution; returns the ids it changed, so a missed guard is seen).
UPDATE_GUARDED = (
    "UPDATE executions AS e SET status = u.status, updated_at = u.updated_at, completed_at = u.completed_at,"
    " result = u.result, reason_code = u.reason_code, reason_description = u.reason_description,"
    f" result_violations = u.violations, lease_owner = CASE WHEN u.status > {LAST_UNACKED} THEN NULL ELSE e.lease_owner END"
    " FROM unnest($1::text[], $2::smallint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::text[],"
    " $9::smallint[]) AS u(execution_id, status, updated_at, completed_at, result, reason_code, reason_description,"
    " violations, expected)"
    " WHERE e.execution_id = u.execution_id AND e.status = u.expected RETURNING e.execution_id"
)
INSERT_EVENTS = (
    f"INSERT INTO events ({EVENT_COLUMNS}) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[],"
    " $5::smallint[], $6::smallint[], $7::bigint[], $8::boolean[], $9::text[], $10::text[], $11::text[], $12::text[],"
    " $13::text[], $14::text[])"
)
TAKE_SEQUENCES = "UPDATE event_counter SET last_seq = last_seq + $1 RETURNING last_seq"
# What a job's first event takes from its job (:func:`events_from_rows`).
JOB_OF_EVENTS = "SELECT job_id, spec, created_at, created_by FROM jobs WHERE job_id = ANY($1::text[])"

_STATUS: dict[int, Status] = {int(s): s for s in Status}


def execution_from_row(row: asyncpg.Record, history: tuple[StateChange, ...] = (), reruns: tuple[str, ...] = ()) -> Execution:
    """An :class:`Execution` from a row of ``EXEC_COLUMNS`` (by position)."""
    violations = row[17]
    return Execution(
        execution_id=row[1],
        command_id=row[2],
        thing_id=row[3],
        action=row[4],
        params_json=row[5],
        ttl_seconds=row[6],
        status=_STATUS[row[7]],
        created_at_ms=row[11],
        updated_at_ms=row[12],
        expires_at_ms=row[14],
        completed_at_ms=row[13],
        result_json=row[8],
        reason=reason_from_columns(row[9], row[10]),
        idempotency_key=row[15] or "",
        thing_type=row[16] or "",
        result_violations=tuple(json.loads(violations)) if violations else (),
        kaa_id=row[18],
        rerun_of=row[19] or "",
        job_id=row[20] or "",
        retry_of=row[21] or "",
        job_attempt=row[22] or 0,
        reruns=reruns,
        history=history,
    )


def execution_row(ex: Execution, fingerprint: str, lease_owner: str, lease_ms: int) -> tuple[Any, ...]:
    """The ``INSERT_EXECUTION`` parameters of a new execution.

    One the device has not acknowledged starts leased to the replica that creates it (``lease_owner``
    for ``lease_ms``), which publishes it at once when its device is connected: no other replica
    claims it before that lease ends.
    """
    leased = ex.status <= LAST_UNACKED
    return (
        ex.execution_id,
        ex.command_id,
        ex.thing_id,
        ex.action,
        ex.params_json,
        ex.ttl_seconds,
        int(ex.status),
        ex.result_json,
        *reason_columns(ex.reason),
        ex.created_at_ms,
        ex.updated_at_ms,
        ex.completed_at_ms,
        ex.expires_at_ms,
        ex.idempotency_key or None,
        fingerprint or None,
        ex.thing_type or None,
        violations_column(ex),
        ex.kaa_id,
        ex.rerun_of or None,
        lease_owner if leased else None,
        ex.created_at_ms + lease_ms if leased else None,
        1 if leased else 0,
        ex.job_id or None,
        ex.retry_of or None,
        ex.job_attempt or None,
    )


def update_arrays(updates: Sequence[tuple[Execution, int]]) -> list[Any]:
    """The ``UPDATE_GUARDED`` parameters: each execution's new state, with the status it must still have."""
    codes = [reason_columns(ex.reason) for ex, _ in updates]
    return [
        [ex.execution_id for ex, _ in updates],
        [int(ex.status) for ex, _ in updates],
        [ex.updated_at_ms for ex, _ in updates],
        [ex.completed_at_ms for ex, _ in updates],
        [ex.result_json for ex, _ in updates],
        [c[0] for c in codes],
        [c[1] for c in codes],
        [violations_column(ex) for ex, _ in updates],
        [expected for _, expected in updates],
    ]


def job_event_parts_of(rows: Sequence[asyncpg.Record]) -> list[dict[str, Any] | None]:
    """The stored parts of each job event of ``rows`` (of ``EVENT_COLUMNS``; None for an execution's event), parsed once."""
    return [job_event_parts(r[13]) if r[13] is not None else None for r in rows]


def event_job_ids(rows: Sequence[asyncpg.Record], parts: Sequence[dict[str, Any] | None]) -> list[str]:
    """The jobs whose first job events ``rows`` (of ``EVENT_COLUMNS``) hold: what :data:`JOB_OF_EVENTS` reads.

    ``parts``: :func:`job_event_parts_of` of ``rows``. A later job event needs nothing of its job's row
    (not its spec: it can be megabytes).
    """
    return list(dict.fromkeys(r[12] for r, p in zip(rows, parts, strict=True) if p is not None and job_event_reads_job(p)))


def events_from_rows(
    rows: Sequence[asyncpg.Record], parts: Sequence[dict[str, Any] | None], jobs: dict[str, asyncpg.Record]
) -> list[StateChange]:
    """The events of rows of ``EVENT_COLUMNS``, job events with their job.

    As SQLite's :func:`server.store.sqlite_schema.events_from_rows`: a job's first event shows its spec
    (from ``jobs``: rows of ``JOB_OF_EVENTS`` by job id); a later one is rebuilt from its stored ``parts``
    (:func:`job_event_parts_of`) alone.
    """
    out: list[StateChange] = []
    for row, stored in zip(rows, parts, strict=True):
        if stored is None:
            out.append(event_from_row(row))
            continue
        job_id = row[12]
        spec_and_creation: tuple[str, int, str] | None = None
        if job_event_reads_job(stored):
            found = jobs.get(job_id)
            if found is None:  # (jobs are never deleted; a job event always has its job)
                continue
            spec_and_creation = (found[1], found[2], found[3])
        out.append(job_event(row[0], job_from_event(job_id, stored, spec_and_creation), row[6]))
    return out


def event_from_row(row: asyncpg.Record) -> StateChange:
    """An execution's :class:`StateChange` from a row of ``EVENT_COLUMNS`` (by position; job events: :func:`events_from_rows`)."""
    prev = row[5]
    return StateChange(
        sequence=row[0],
        execution_id=row[1],
        thing_id=row[2],
        action=row[3],
        status=_STATUS[row[4]],
        previous_status=_STATUS[prev] if prev is not None else None,
        at_ms=row[6],
        late=row[7],
        result_json=row[8],
        reason=reason_from_columns(row[9], row[10]),
        note=row[11],
        job_id=row[12] or "",
    )


def event_arrays(events: Sequence[StateChange]) -> list[list[Any]]:
    """The ``INSERT_EVENTS`` parameters (one array per column)."""
    reasons = [reason_columns(e.reason) for e in events]
    return [
        [e.sequence for e in events],
        [e.execution_id for e in events],
        [e.thing_id for e in events],
        [e.action for e in events],
        [int(e.status) for e in events],
        [int(e.previous_status) if e.previous_status is not None else None for e in events],
        [e.at_ms for e in events],
        [e.late for e in events],
        [e.result_json for e in events],
        [r[0] for r in reasons],
        [r[1] for r in reasons],
        [e.note for e in events],
        [e.job_id or None for e in events],
        [job_event_json(e.job) if e.job is not None else None for e in events],
    ]
