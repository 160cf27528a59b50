"""The SQLite schema of :mod:`server.store.sqlite` and the conversions between its rows and the models.

The DDL and its migrations, the column lists and the hot SQL statements, the
row <-> model conversions and the connection set-up (PRAGMAs).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
)

# 7 only marks PostgreSQL's schema 7 (jobs.lock_owner, jobs_unsettled: what several replicas need), nothing here.
SCHEMA_VERSION = 7

SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    idx                INTEGER PRIMARY KEY,
    execution_id       TEXT NOT NULL UNIQUE,
    command_id         TEXT NOT NULL,
    thing_id           TEXT NOT NULL,
    action             TEXT NOT NULL,
    params             TEXT,
    ttl_seconds        INTEGER NOT NULL,
    status             INTEGER NOT NULL,
    result             TEXT,
    reason_code        TEXT,
    reason_description TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    completed_at       INTEGER,
    expires_at         INTEGER NOT NULL,
    idempotency_key    TEXT,
    fingerprint        TEXT,
    thing_type         TEXT,
    result_violations  TEXT,
    kaa_id             INTEGER,
    rerun_of           TEXT,
    job_id             TEXT,
    retry_of           TEXT,
    job_attempt        INTEGER,
    handed             INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS executions_idempotency
    ON executions(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS executions_thing ON executions(thing_id, idx);
CREATE INDEX IF NOT EXISTS executions_action ON executions(action, idx);
CREATE INDEX IF NOT EXISTS executions_status ON executions(status, idx);
CREATE INDEX IF NOT EXISTS executions_kaa ON executions(thing_id, action, kaa_id) WHERE kaa_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS executions_rerun ON executions(rerun_of) WHERE rerun_of IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    seq                INTEGER PRIMARY KEY,
    execution_id       TEXT NOT NULL,
    thing_id           TEXT NOT NULL,
    action             TEXT NOT NULL,
    status             INTEGER NOT NULL,
    previous_status    INTEGER,
    at                 INTEGER NOT NULL,
    late               INTEGER NOT NULL DEFAULT 0,
    result             TEXT,
    reason_code        TEXT,
    reason_description TEXT,
    note               TEXT NOT NULL DEFAULT '',
    job_id             TEXT,
    job                TEXT
);
CREATE INDEX IF NOT EXISTS events_execution ON events(execution_id, seq);
-- A job's events and its executions' events, for a Stream that filters by job (job: the
-- changing parts of a job event's Job, models.job_event_json; NULL for an execution's event).
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq) WHERE job_id IS NOT NULL;
-- Finished executions by completion time, for the retention sweep.
CREATE INDEX IF NOT EXISTS executions_completed ON executions(completed_at) WHERE completed_at IS NOT NULL;
-- Small service state: 'ping' (readiness writes it), 'purged_through_seq' (retention's watermark).
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS things (
    thing_id               TEXT PRIMARY KEY,
    thing_type             TEXT NOT NULL DEFAULT '',
    attributes             TEXT NOT NULL DEFAULT '{}',
    token_hash             TEXT NOT NULL,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    credentials_rotated_at INTEGER NOT NULL,
    last_seen              INTEGER,
    last_client_id         TEXT NOT NULL DEFAULT '',
    last_remote_address    TEXT NOT NULL DEFAULT '',
    last_connected_at      INTEGER,
    kaa_app_version        TEXT NOT NULL DEFAULT '',
    kaa_token_hash         TEXT,
    broker_password_hash   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS things_type ON things(thing_type);
CREATE UNIQUE INDEX IF NOT EXISTS things_kaa_token ON things(kaa_token_hash) WHERE kaa_token_hash IS NOT NULL;
CREATE TABLE IF NOT EXISTS thing_types (
    name        TEXT PRIMARY KEY,
    definition  TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
-- Jobs (server/store/sqlite_jobs.py): one execution per (job, thing, attempt), enforced here.
CREATE UNIQUE INDEX IF NOT EXISTS executions_job_attempt
    ON executions(job_id, thing_id, job_attempt) WHERE job_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS executions_job ON executions(job_id, idx) WHERE job_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS jobs (
    idx             INTEGER PRIMARY KEY,
    job_id          TEXT NOT NULL UNIQUE,
    spec            TEXT NOT NULL,
    state           INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    ended_at        INTEGER,
    abort_reason    TEXT NOT NULL DEFAULT '',
    created_by      TEXT NOT NULL DEFAULT '',
    targets_total   INTEGER NOT NULL DEFAULT 0,
    resolved        INTEGER NOT NULL DEFAULT 0,
    resolve_cursor  TEXT NOT NULL DEFAULT '',
    counts          TEXT,
    idempotency_key TEXT,
    fingerprint     TEXT NOT NULL DEFAULT '',
    sequential      INTEGER NOT NULL DEFAULT 0,
    -- A CANCELED job's cancel spared the delivered executions (a restart cancels again alike).
    only_undelivered INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, idx);
-- One row per (job, thing): its order, its latest attempt and what became of it (TargetState).
CREATE TABLE IF NOT EXISTS job_targets (
    job_id        TEXT NOT NULL,
    thing_id      TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    state         INTEGER NOT NULL,
    attempt       INTEGER NOT NULL DEFAULT 0,
    execution_id  TEXT,
    status        INTEGER,
    due_at        INTEGER,
    dispatched_at INTEGER,
    reason        TEXT,
    PRIMARY KEY (job_id, thing_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_targets_state ON job_targets(job_id, state, seq);
CREATE INDEX IF NOT EXISTS job_targets_due ON job_targets(job_id, due_at) WHERE state = 3;
CREATE INDEX IF NOT EXISTS job_targets_thing ON job_targets(thing_id) WHERE state = 1;
CREATE TABLE IF NOT EXISTS api_keys (
    key_id      TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
"""

# Columns added to tables of older schema versions: (version added, table, column definition).
MIGRATIONS = (
    (2, "executions", "thing_type TEXT"),
    (2, "executions", "result_violations TEXT"),
    (3, "executions", "kaa_id INTEGER"),
    (3, "executions", "rerun_of TEXT"),
    (3, "things", "kaa_app_version TEXT NOT NULL DEFAULT ''"),
    (3, "things", "kaa_token_hash TEXT"),
    (4, "executions", "job_id TEXT"),
    (4, "executions", "retry_of TEXT"),
    (4, "executions", "job_attempt INTEGER"),
    # The password in mosquitto's password_file format (broker-config --mosquitto); '' for older things.
    (5, "things", "broker_password_hash TEXT NOT NULL DEFAULT ''"),
    # 1: the external broker acknowledged the request's publish (server/core/handover.py).
    (5, "executions", "handed INTEGER NOT NULL DEFAULT 0"),
    # Job events (server/core/job_runner.py): a job's events carry its id and its snapshot.
    (6, "events", "job_id TEXT"),
    (6, "events", "job TEXT"),
    (6, "jobs", "only_undelivered INTEGER NOT NULL DEFAULT 0"),
)

EXEC_COLUMNS = (
    "idx, execution_id, command_id, thing_id, action, params, ttl_seconds, status, result, "
    "reason_code, reason_description, created_at, updated_at, completed_at, expires_at, idempotency_key, "
    "thing_type, result_violations, kaa_id, rerun_of, job_id, retry_of, job_attempt"
)
EVENT_COLUMNS = (
    "seq, execution_id, thing_id, action, status, previous_status, at, late, result, reason_code, reason_description, note,"
    " job_id, job"
)


_STATUS: dict[int, Status] = {int(s): s for s in Status}

# Hot statements, built once (sqlite3 caches the prepared statement by its text).
SELECT_EXECUTION = f"SELECT {EXEC_COLUMNS} FROM executions WHERE execution_id = ?"
SELECT_BY_KEY = f"SELECT {EXEC_COLUMNS}, fingerprint FROM executions WHERE idempotency_key = ?"
SELECT_MAX_KAA = "SELECT COALESCE(MAX(kaa_id), 0) FROM executions WHERE thing_id = ? AND action = ? AND kaa_id IS NOT NULL"
# Every column: an execution created and changed within one batch is written once, as it ends up.
INSERT_EXECUTION = (
    "INSERT INTO executions (execution_id, command_id, thing_id, action, params, ttl_seconds, status, result,"
    " reason_code, reason_description, created_at, updated_at, completed_at, expires_at, idempotency_key,"
    " fingerprint, thing_type, result_violations, kaa_id, rerun_of, job_id, retry_of, job_attempt)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
UPDATE_EXECUTION = (
    "UPDATE executions SET status = ?, updated_at = ?, completed_at = ?, result = ?,"
    " reason_code = ?, reason_description = ?, result_violations = ? WHERE execution_id = ?"
)
INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"


def execution_from_row(row: Sequence[Any], history: tuple[StateChange, ...] = (), reruns: tuple[str, ...] = ()) -> Execution:
    """An :class:`Execution` from a row of ``EXEC_COLUMNS``."""
    # By position (the order of EXEC_COLUMNS): cheaper than by name, and works for plain tuples too.
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


def events_from_rows(conn: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> list[StateChange]:
    """The events of rows of ``EVENT_COLUMNS``, job events with their job.

    Only a job's first event shows its spec: the job's row is read (once per job) for it alone
    (and for an event stored before events told which was first, :func:`job_event_reads_job`).
    """
    jobs: dict[str, tuple[str, int, str] | None] = {}
    out: list[StateChange] = []
    for row in rows:
        if row[13] is None:
            out.append(event_from_row(row))
            continue
        job_id = row[12]
        parts = job_event_parts(row[13])
        stored: tuple[str, int, str] | None = None
        if job_event_reads_job(parts):
            if job_id not in jobs:
                found = conn.execute("SELECT spec, created_at, created_by FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                jobs[job_id] = (found[0], found[1], found[2]) if found is not None else None
            stored = jobs[job_id]
            if stored is None:  # (jobs are never deleted; a job event always has its job)
                continue
        out.append(job_event(row[0], job_from_event(job_id, parts, stored), row[6]))
    return out


def event_from_row(row: Sequence[Any]) -> StateChange:
    """A :class:`StateChange` of an execution from a row of ``EVENT_COLUMNS`` (a job event: :func:`events_from_rows`)."""
    # By position: the order of EVENT_COLUMNS.
    prev = row[5]
    return StateChange(
        sequence=row[0],
        execution_id=row[1],
        thing_id=row[2],
        action=row[3],
        status=_STATUS[row[4]],
        previous_status=_STATUS[prev] if prev is not None else None,
        at_ms=row[6],
        late=bool(row[7]),
        result_json=row[8],
        reason=reason_from_columns(row[9], row[10]),
        note=row[11],
        job_id=row[12] or "",
    )


def event_row(e: StateChange) -> tuple[Any, ...]:
    """The ``INSERT_EVENT`` parameters for an event."""
    return (
        e.sequence,
        e.execution_id,
        e.thing_id,
        e.action,
        int(e.status),
        int(e.previous_status) if e.previous_status is not None else None,
        e.at_ms,
        int(e.late),
        e.result_json,
        *reason_columns(e.reason),
        e.note,
        e.job_id or None,
        job_event_json(e.job) if e.job is not None else None,
    )


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open a connection to ``path`` with the store's PRAGMAs (read-only or the WAL writer)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed batch survives power loss too, not only a killed process.
        conn.execute("PRAGMA synchronous = FULL")
    return conn
