"""The ledger: every task and credential state change, each a compare-and-set.

Functions take `session` and never commit: the caller owns the unit of work
and enqueues worker jobs (ids only) after its commit.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import sqlalchemy
from sqlalchemy import case, delete, exists, func, literal, null, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import Session, col, select

from app.authority import policy, scope
from app.core import sealing
from app.core.models import (
    LIVE_CRED_STATES,
    SETTLED_CRED_STATES,
    WAITING_CRED_STATES,
    ApiKey,
    AuditEntry,
    Credential,
    CredState,
    Event,
    Installation,
    KillSwitch,
    MintLease,
    Sweep,
    Task,
    TaskCA,
    TaskState,
    UTCDateTime,
    new_id,
    utcnow,
)
from app.core.redact import LONG_TEXT, clip
from app.core.settings import get_settings
from app.issuers.base import mark
from app.profiles import Profile, ProxyProfile
from app.proxy.ca import make_ca, upstream_host

TERMINAL_EVENTS = {
    "task.succeeded": (TaskState.succeeded, "succeeded"),
    "task.failed": (TaskState.failed, "failed"),
    "task.cancelled": (TaskState.cancelled, "cancelled"),
}
EVENT_TYPES = ("task.started", "task.heartbeat", *TERMINAL_EVENTS)
MAX_DEPTH = 4  # levels of tasks, the root included
MAX_CHILDREN = 64
# When a pending or revoking row is due again if nothing moved it (its message was lost,
# its worker killed): the deadline sweep, every LEASEHOLD_SWEEP_INTERVAL, enqueues what
# is due. A revoke is found again within REVOKE_REDRIVE plus one sweep interval.
REVOKE_REDRIVE = timedelta(seconds=15)
MINT_REDRIVE = timedelta(seconds=30)
# A mint holds its credential this long; a mint is bounded well below it (every backend
# call has a timeout), so a second delivery never runs while the first still can record.
MINT_LEASE = timedelta(seconds=60)


class LedgerError(Exception):
    """A refusal with an HTTP status; nothing of the unit of work is kept."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra
        # Audit entries kept although the unit of work is not (a refused heartbeat).
        self.audit: list[dict[str, Any]] = []


def record_refusal(session: Session, exc: LedgerError, *, now: datetime | None = None) -> None:
    """Write a refusal's audit entries in a unit of work of their own."""
    for entry in exc.audit:
        audit(session, **entry, now=now or utcnow())


@dataclass
class EventIn:
    """A validated CloudEvent, as the ledger needs it."""

    source: str
    id: str
    type: str
    subject: str
    time: datetime | None
    data: dict[str, Any] | None
    body_hash: str


@dataclass
class EventResult:
    task: AnyTask
    duplicate: bool
    to_mint: list[str] = field(default_factory=list)
    to_revoke: list[str] = field(default_factory=list)
    to_extend: list[str] = field(default_factory=list)
    to_ask: list[str] = field(default_factory=list)  # awaiting approval, with a webhook


def installation(session: Session) -> Installation:
    row = session.exec(select(Installation)).first()
    if row is None:
        raise RuntimeError("ledger has no installation row: run `leasehold db upgrade`")
    return row


def installation_id() -> str:
    """This ledger's installation id, read once per process (and database URL): it never
    changes, and every mint, event and reconciliation needs it."""
    return _installation_id(get_settings().sqlalchemy_url)


@lru_cache
def _installation_id(url: str) -> str:
    from app.core.db import session_scope  # the one read of its own: the ledger owns the row

    with session_scope() as session:
        return installation(session).id


@dataclass(slots=True)
class TaskRow:
    """A task row as the event path reads and writes it with Core statements: what a
    `Task` holds, without the ORM's instance state (building a `Task` costs more than
    the statement that stores it)."""

    id: str
    tenant: str
    name: str
    owner_key_id: str
    source: str
    workload: str | None
    parent_id: str | None
    depth: int
    state: str
    max_ttl: int | None
    claim_generation: int
    started_at: datetime | None
    deadline: datetime | None
    ended_at: datetime | None
    created_at: datetime


# A task as the transitions take it: an ORM row (an operator's cancel, the deadline
# sweep, a rotation) or a Core one (an event).
AnyTask = Task | TaskRow

# The tables, for Core statements on the hot paths: no unit of work, no identity map.
_TASKS: sqlalchemy.Table = Task.__table__  # type: ignore[attr-defined]
_CREDS: sqlalchemy.Table = Credential.__table__  # type: ignore[attr-defined]
_EVENTS: sqlalchemy.Table = Event.__table__  # type: ignore[attr-defined]
_AUDIT: sqlalchemy.Table = AuditEntry.__table__  # type: ignore[attr-defined]
_TASK_CAS: sqlalchemy.Table = TaskCA.__table__  # type: ignore[attr-defined]
_SWITCHES: sqlalchemy.Table = KillSwitch.__table__  # type: ignore[attr-defined]
_TASK_FIELDS = tuple(f.name for f in fields(TaskRow))
_AUDIT_INSERT = sqlalchemy.insert(_AUDIT)
# What a new credential row holds before its mint: every column an INSERT leaves out
# (the model's defaults; an executemany needs the same keys in every row).
_CRED_DEFAULTS: dict[str, Any] = {
    "backend_ref": None,
    "backend_lease": None,
    "token_digest": None,
    "minted_at": None,
    "claimed_at": None,
    "revoked_at": None,
    "revoke_reason": None,
    "revoke_requested_at": None,
    "approved_at": None,
    "attempts": 0,
    "last_error": None,
    "sealed_secret": None,
}
_CHILD = _TASKS.alias("child")
# Running -> ended (CAS), answering whether a running child is left to end with it.
_END_TASK = (
    sqlalchemy.update(_TASKS)
    .where(
        _TASKS.c.id == sqlalchemy.bindparam("task_id"),
        _TASKS.c.state == TaskState.running.value,
    )
    .values(state=sqlalchemy.bindparam("new_state"), ended_at=sqlalchemy.bindparam("at"))
    .returning(
        exists()
        # The id bound again, not correlated: SQLite's RETURNING drops table prefixes.
        .where(
            _CHILD.c.parent_id == sqlalchemy.bindparam("task_id"),
            _CHILD.c.state == TaskState.running.value,
        )
        .label("has_children")
    )
)


def _pg_end_statement() -> sqlalchemy.Select[Any]:
    """A task's end on PostgreSQL in one statement: running -> ended (CAS, answering
    whether a running child is left), its CA's key destroyed, its live credentials ->
    revoking as request_revoke moves them (the secret destroyed, due again after
    REVOKE_REDRIVE). No row: the task was not running. Else one row per credential
    moved (id NULL when none), each with has_children."""
    t, c, ca = _TASKS, _CREDS, _TASK_CAS
    task_id: sqlalchemy.BindParameter[str] = sqlalchemy.bindparam("b_task_id")
    ended = (
        sqlalchemy.update(t)
        .where(t.c.id == task_id, t.c.state == TaskState.running.value)
        .values(state=sqlalchemy.bindparam("new_state"), ended_at=sqlalchemy.bindparam("at"))
        .returning(
            t.c.id,
            exists()
            .where(_CHILD.c.parent_id == t.c.id, _CHILD.c.state == TaskState.running.value)
            .label("has_children"),
        )
        .cte("ended")
    )
    at: sqlalchemy.BindParameter[datetime] = sqlalchemy.bindparam("at")
    revoked = (
        sqlalchemy.update(c)
        .where(
            c.c.task_id == task_id,
            c.c.state.in_(LIVE_CRED_STATES),
            c.c.task_id.in_(sqlalchemy.select(ended.c.id)),
        )
        .values(
            state=CredState.revoking.value,
            revoke_reason=sqlalchemy.bindparam("b_reason"),
            revoke_requested_at=at,
            sealed_secret=null(),
            next_attempt_at=sqlalchemy.bindparam("b_redrive"),
            updated_at=at,
        )
        .returning(c.c.id, c.c.tenant, c.c.task_id)
        .cte("revoked")
    )
    sealed = (
        sqlalchemy.update(ca)
        .where(ca.c.task_id.in_(sqlalchemy.select(ended.c.id)))
        .values(sealed_key=null())
        .cte("sealed")
    )
    return (
        sqlalchemy.select(ended.c.has_children, revoked.c.id, revoked.c.tenant, revoked.c.task_id)
        .select_from(ended.outerjoin(revoked, sqlalchemy.true()))
        .add_cte(sealed)
    )


_PG_END = _pg_end_statement()
_SEAL_CA = (
    sqlalchemy.update(_TASK_CAS)
    .where(_TASK_CAS.c.task_id == sqlalchemy.bindparam("ca_task_id"))
    .values(sealed_key=None)
)


def _audit_row(
    action: str,
    *,
    actor: str,
    now: datetime,
    tenant: str | None = None,
    task_id: str | None = None,
    credential_id: str | None = None,
    reason: str | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    """An audit entry as an INSERT's parameters; its id (time-ordered: the export's
    order) is taken now, so entries keep the order they were decided in."""
    return {
        "id": new_id(),
        "at": now,
        "tenant": tenant,
        "actor": actor,
        "action": action,
        "task_id": task_id,
        "credential_id": credential_id,
        "reason": reason,
        "detail": detail,
        "exported_seq": None,
        "export_hash": None,
    }


def write_audit(session: Session, rows: list[dict[str, Any]]) -> None:
    """Audit entries in one statement: several as one JSON array on PostgreSQL (an
    executemany would send one INSERT per row)."""
    if len(rows) > 1 and session.get_bind().dialect.name == "postgresql":
        session.execute(_PG_AUDIT, {"audit": _to_json(rows)})
    elif rows:
        session.execute(_AUDIT_INSERT, rows)


@dataclass(slots=True)
class _Batch:
    """The rows one event writes, each a dict of every column: written together at the
    end (write_batch), in one statement on PostgreSQL."""

    tasks: list[dict[str, Any]] = field(default_factory=list)
    creds: list[dict[str, Any]] = field(default_factory=list)
    cas: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)


# Every row of a batch in one round trip: each table's rows as one JSON array expanded
# by json_populate_recordset (the table's own row type, so `SELECT *` is its column
# order). One constant text: prepared once, whatever the row counts. A credential's
# foreign key sees its task: the checks run at the statement's end.
_PG_BATCH = sqlalchemy.text(
    "WITH new_tasks AS (INSERT INTO tasks"
    " SELECT * FROM json_populate_recordset(NULL::tasks, CAST(:tasks AS json))),"
    " new_creds AS (INSERT INTO credentials"
    " SELECT * FROM json_populate_recordset(NULL::credentials, CAST(:creds AS json))),"
    " new_cas AS (INSERT INTO task_cas"
    " SELECT * FROM json_populate_recordset(NULL::task_cas, CAST(:cas AS json))),"
    " new_events AS (INSERT INTO events"
    " SELECT * FROM json_populate_recordset(NULL::events, CAST(:events AS json)))"
    " INSERT INTO audit"
    " SELECT * FROM json_populate_recordset(NULL::audit, CAST(:audit AS json))"
)


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:  # as UTCDateTime refuses it: no guessing the zone
            raise ValueError("naive datetime")
        return value.isoformat()  # with its offset: PostgreSQL reads it as timestamptz
    raise TypeError(f"{type(value).__name__} is not a column value")


_to_json = json.JSONEncoder(default=_json_value).encode


_PG_AUDIT = sqlalchemy.text(
    "INSERT INTO audit SELECT * FROM json_populate_recordset(NULL::audit, CAST(:audit AS json))"
)


def write_batch(session: Session, batch: _Batch) -> None:
    """A batch's rows: one statement on PostgreSQL; on SQLite (no data-modifying WITH)
    one INSERT per table, parents first."""
    tables = (
        ("tasks", _TASKS, batch.tasks),
        ("creds", _CREDS, batch.creds),
        ("cas", _TASK_CAS, batch.cas),
        ("events", _EVENTS, batch.events),
        ("audit", _AUDIT, batch.audit),
    )
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_PG_BATCH, {name: _to_json(rows) for name, _, rows in tables})
        return
    for _, table, rows in tables:
        if rows:
            session.execute(sqlalchemy.insert(table), rows)


def audit(
    session: Session,
    action: str,
    *,
    actor: str,
    tenant: str | None = None,
    task_id: str | None = None,
    credential_id: str | None = None,
    reason: str | None = None,
    detail: str | None = None,
    now: datetime | None = None,
) -> None:
    # A Core INSERT at once: no AuditEntry object, no unit-of-work flush at commit.
    write_audit(
        session,
        [
            _audit_row(
                action,
                actor=actor,
                now=now or utcnow(),
                tenant=tenant,
                task_id=task_id,
                credential_id=credential_id,
                reason=reason,
                detail=detail,
            )
        ],
    )


def audit_credential(
    session: Session,
    cred: Credential | str,
    action: str,
    *,
    actor: str,
    now: datetime,
    reason: str | None = None,
    detail: str | None = None,
) -> Credential:
    """An audit entry about one credential (given or loaded by id); returns it."""
    if isinstance(cred, str):
        loaded = session.get(Credential, cred)
        assert loaded is not None
        cred = loaded
    audit(
        session,
        action,
        actor=actor,
        tenant=cred.tenant,
        task_id=cred.task_id,
        credential_id=cred.id,
        reason=reason,
        detail=detail,
        now=now,
    )
    return cred


def find_task(session: Session, tenant: str, name: str, *, lock: bool = False) -> Task | None:
    query = select(Task).where(Task.tenant == tenant, Task.name == name)
    if lock:
        query = query.with_for_update()
    return session.exec(query).first()


def task_credentials(session: Session, task_pk: str) -> list[Credential]:
    return list(
        session.exec(
            select(Credential)
            .where(Credential.task_id == task_pk)
            .order_by(col(Credential.grant), col(Credential.generation))
        )
    )


# --- events --------------------------------------------------------------


def check_grants(event: EventIn, tenant: str, profiles: dict[str, Profile]) -> None:
    """A task.started's grants against the profiles: each known, not retired, open to
    the tenant, a JWT-claimed one with a workload, max_duration within every max_ttl."""
    if event.type != "task.started" or event.data is None:
        return
    smallest: tuple[int, str] | None = None
    for grant in event.data["grants"]:
        name = grant["profile"]
        profile = profiles.get(name)
        if profile is None:
            raise LedgerError(422, f"grant {grant['name']!r}: unknown profile {name!r}")
        if profile.retired:
            raise LedgerError(422, f"grant {grant['name']!r}: profile {name!r} is retired")
        if not profile.open_to(tenant):
            raise LedgerError(
                422, f"grant {grant['name']!r}: profile {name!r} is not open to this tenant"
            )
        if profile.claim == "jwt" and not event.data.get("workload"):
            # The claim proves the workload against this name: without one, nothing could.
            raise LedgerError(
                422,
                f"grant {grant['name']!r}: profile {name!r} is claimed with a JWT; "
                "the event must name its workload",
            )
        if smallest is None or profile.max_ttl < smallest[0]:
            smallest = (profile.max_ttl, name)
    assert smallest is not None
    if event.data["max_duration"] > smallest[0]:
        raise LedgerError(
            422,
            f"max_duration {event.data['max_duration']} is over the max_ttl of profile "
            f"{smallest[1]!r} ({smallest[0]})",
            max_ttl=smallest[0],  # machine-readable: `leasehold run` starts with it
        )


@lru_cache
def _lookup_statement(with_switches: bool) -> sqlalchemy.Select[Any]:
    """The duplicate check and the task (locked), in one round trip: always one row,
    its event columns NULL when the event is new, its task columns NULL when the task
    is. For a start, also whether any kill switch can match the tenant (the switches
    are read only then). Built once, bound per call: the compiled form is cached. The
    lock is taken in a CTE: PostgreSQL refuses FOR UPDATE on the nullable side of a join."""
    t = _TASKS
    tenant: sqlalchemy.BindParameter[str] = sqlalchemy.bindparam("tenant")
    locked = (
        sqlalchemy.select(*t.c)
        .where(t.c.tenant == tenant, t.c.name == sqlalchemy.bindparam("name"))
        .with_for_update(of=t)
        .cte("locked")
    )
    seen = (
        sqlalchemy.select(
            _EVENTS.c.type.label("seen_type"),
            _EVENTS.c.subject.label("seen_subject"),
            _EVENTS.c.data.label("seen_data"),
        )
        .where(
            _EVENTS.c.tenant == tenant,
            _EVENTS.c.source == sqlalchemy.bindparam("source"),
            _EVENTS.c.event_id == sqlalchemy.bindparam("event_id"),
        )
        .subquery("seen")
    )
    one = sqlalchemy.select(sqlalchemy.literal_column("1").label("one")).subquery("one")
    columns: list[Any] = [seen.c.seen_type, seen.c.seen_subject, seen.c.seen_data, *locked.c]
    if with_switches:
        switched = exists().where(
            _SWITCHES.c.lifted_at.is_(None),
            or_(_SWITCHES.c.tenant.is_(None), _SWITCHES.c.tenant == tenant),
        )
        columns.append(switched.label("switched"))
    true = sqlalchemy.true()
    return sqlalchemy.select(*columns).select_from(
        one.outerjoin(seen, true).outerjoin(locked, true)
    )


@dataclass(slots=True)
class _Lookup:
    seen: tuple[str, str, Any] | None  # (type, subject, data) of the stored event
    task: TaskRow | None
    switched: bool  # a kill switch in force may match the tenant (starts only)


def _lookup(session: Session, tenant: str, event: EventIn) -> _Lookup:
    starting = event.type == "task.started"
    row = (
        session.execute(
            _lookup_statement(starting),
            {
                "tenant": tenant,
                "name": event.subject,
                "source": event.source,
                "event_id": event.id,
            },
        )
        .mappings()
        .one()
    )
    task = TaskRow(*(row[f] for f in _TASK_FIELDS)) if row["id"] is not None else None
    return _Lookup(
        seen=(row["seen_type"], row["seen_subject"], row["seen_data"])
        if row["seen_type"] is not None
        else None,
        task=task,
        switched=bool(row["switched"]) if starting else True,
    )


def apply_event(
    session: Session,
    *,
    key: ApiKey,
    event: EventIn,
    profiles: dict[str, Profile],
    installation_id: str,
    retention_days: int,
    now: datetime | None = None,
) -> EventResult:
    """Store one event and apply its transition; raise LedgerError to refuse it.

    The profile rules (check_grants) run only for an event not seen before, so a
    retried event is a duplicate even when a profile it names has changed since.
    Core statements throughout (no ORM flush): the lookup, the transition's writes,
    then the event row and every audit entry of the event in one INSERT each."""
    now = now or utcnow()
    tenant = key.tenant or ""
    refusal = scope.source_refusal(key.sources, event.source)
    if refusal is not None:  # before anything is looked up or stored
        raise LedgerError(403, refusal)
    found = _lookup(session, tenant, event)
    task = found.task
    if task is not None and task.owner_key_id != key.id:
        raise LedgerError(403, "this task belongs to another emitter key")
    if found.seen is not None:
        # The same event when type, subject and data agree (PRODUCT.md); compared as
        # stored, so rows written before the identity hash changed still match.
        if found.seen != (event.type, event.subject, event.data):
            raise LedgerError(
                409, "an event with this source and id but another type, subject or data exists"
            )
        if task is None:  # e.g. a refused heartbeat's key reused: nothing to show
            raise LedgerError(409, "event already seen")
        return EventResult(task=task, duplicate=True)
    check_grants(event, tenant, profiles)

    batch = _Batch()
    audits = batch.audit
    result: EventResult
    if event.type == "task.started":
        result = _start(
            session,
            key,
            event,
            task,
            profiles,
            installation_id,
            retention_days,
            now,
            switched=found.switched,
            batch=batch,
        )
    elif event.type == "task.heartbeat":
        result = _heartbeat(session, key, event, task, now)
    else:
        state, reason = TERMINAL_EVENTS[event.type]
        if task is None:
            task = TaskRow(
                id=new_id(),
                tenant=tenant,
                name=event.subject,
                owner_key_id=key.id,
                source=event.source,
                workload=None,
                parent_id=None,
                depth=0,
                state=state,
                max_ttl=None,
                claim_generation=0,
                started_at=None,
                deadline=None,
                ended_at=now,
                created_at=now,
            )
            batch.tasks.append(asdict(task))
            audits.append(
                _audit_row(
                    "task_ended",
                    actor=key.name,
                    tenant=tenant,
                    task_id=task.id,
                    reason=reason,
                    detail="terminal event before start",
                    now=now,
                )
            )
            result = EventResult(task=task, duplicate=False)
        else:
            revoke = end_task(
                session,
                task,
                state,
                reason,
                actor=key.name,
                now=now,
                audits=audits,
            )
            result = EventResult(task=task, duplicate=False, to_revoke=revoke)

    batch.events.append(
        {
            "id": new_id(),
            "tenant": tenant,
            "source": event.source,
            "event_id": event.id,
            "type": event.type,
            "subject": event.subject,
            "body_hash": event.body_hash,
            "key_id": key.id,
            "time": event.time,
            "received_at": now,
            "data": event.data,
        }
    )
    # Every event received is in the audit trail too, so one listing tells a task's story.
    audits.append(
        _audit_row(
            "event",
            actor=key.name,
            tenant=tenant,
            task_id=result.task.id,
            reason=event.type.removeprefix("task."),
            detail=f"{event.source} {event.id}",
            now=now,
        )
    )
    write_batch(session, batch)
    return result


def _start(
    session: Session,
    key: ApiKey,
    event: EventIn,
    task: TaskRow | None,
    profiles: dict[str, Profile],
    installation_id: str,
    retention_days: int,
    now: datetime,
    *,
    switched: bool,
    batch: _Batch,
) -> EventResult:
    data = event.data or {}
    if event.time is not None and event.time < now - timedelta(days=retention_days):
        raise LedgerError(422, f"event time is older than the retention of {retention_days} days")
    if task is not None:  # a repeat start, or a start after the end: mints nothing
        return EventResult(task=task, duplicate=False)
    tenant = key.tenant or ""
    grants: list[dict[str, str]] = data["grants"]
    chosen = [profiles[g["profile"]] for g in grants]
    started = min(event.time or now, now)
    deadline = started + timedelta(seconds=int(data["max_duration"]))
    parent = _parent_for(session, key, data.get("parent"))
    held: set[str] = set()
    if parent is not None:
        deadline = min(deadline, parent.deadline or deadline)
        held = {
            c.profile
            for c in task_credentials(session, parent.id)
            if c.state in (CredState.pending, CredState.active)
        }
    new = TaskRow(
        id=new_id(),
        tenant=tenant,
        name=event.subject,
        owner_key_id=key.id,
        source=event.source,
        workload=data.get("workload"),
        parent_id=parent.id if parent else None,
        depth=parent.depth + 1 if parent else 0,
        state=TaskState.running,
        max_ttl=min(p.max_ttl for p in chosen),
        claim_generation=0,
        started_at=started,
        deadline=deadline,
        ended_at=None,
        created_at=now,
    )
    batch.tasks.append(asdict(new))
    batch.audit.append(
        _audit_row("task_started", actor=key.name, tenant=tenant, task_id=new.id, now=now)
    )
    result = EventResult(task=new, duplicate=False)
    grant_list = [(g["name"], p, 0) for g, p in zip(grants, chosen, strict=True)]
    made = issue_grants(
        session,
        key,
        new,
        grant_list,
        parent=parent,
        held=held,
        max_duration=int(data["max_duration"]),
        installation_id=installation_id,
        now=now,
        result=result,
        switched=switched,
        batch=batch,
    )
    _make_task_ca(new, [p for p, state in made if state != CredState.denied], now=now, batch=batch)
    return result


def issue_grants(
    session: Session,
    key: ApiKey,
    task: AnyTask,
    grants: list[tuple[str, Profile, int]],
    *,
    parent: Task | None,
    held: set[str],
    max_duration: int,
    installation_id: str,
    now: datetime,
    result: EventResult,
    switched: bool = True,
    batch: _Batch | None = None,
) -> list[tuple[Profile, str]]:
    """A credential row for each (grant, profile, generation) of a running task, decided
    as a start decides it: the parent's holdings, the key's scope, a kill switch, the
    policy, then approval. Adds what to mint or ask about to `result`; returns each
    grant's profile and state. The rows and audit entries go to `batch` when given (the
    caller writes it), else are written here. `switched` False: the
    caller knows no switch in force can match the tenant (nothing to read)."""
    tenant = task.tenant
    started = task.started_at or now
    deadline = task.deadline or now
    chosen = [p for _, p, _ in grants]
    # Out of the key's scope is refused before any policy is asked.
    refusals = [
        scope.grant_refusal(key.workloads, key.profiles, task.workload, p.name) for p in chosen
    ]
    switches = switches_in_force(session, tenant) if switched else []
    asked = [p for p, refused in zip(chosen, refusals, strict=True) if refused is None]
    decided = dict(
        zip(
            (p.name for p in asked),
            policy.authorize(
                [
                    policy.Ask(
                        action="mint",
                        workload=task.workload,
                        profile=p.name,
                        issuer=p.issuer,
                        tenant=tenant,
                        emitter=key.name,
                        source=task.source,
                        task=task.name,
                        parent=parent.name if parent else None,
                        max_duration=max_duration,
                    )
                    for p in asked
                ]
            ),
            strict=True,
        )
    )
    made: list[tuple[Profile, str]] = []
    out = _Batch() if batch is None else batch
    rows, entries = out.creds, out.audit
    for (name, profile, generation), refused in zip(grants, refusals, strict=True):
        state = CredState.pending
        why, code = "", ""
        decision = decided.get(profile.name)
        switch = next((k for k in switches if switch_matches(k, task, profile.name)), None)
        if parent is not None and not (
            profile.name in held or (profile.narrows is not None and profile.narrows in held)
        ):
            state, why, code = CredState.denied, "parent does not hold this profile", "parent"
        elif refused is not None:
            state, why, code = CredState.denied, refused, "out_of_scope"
        elif switch is not None:
            state, code = CredState.denied, "kill_switch"
            why = f"kill switch {switch.id} is in force ({describe_match(switch)})"
        elif decision is not None and not decision.allowed:
            state, code = CredState.denied, "policy"
            why = f"mint denied by policy: {decision.reason}"
        elif profile.approval:
            state = CredState.awaiting_approval
        cred_id = new_id()
        rows.append(
            {
                **_CRED_DEFAULTS,
                "id": cred_id,
                "tenant": tenant,
                "task_id": task.id,
                "grant": name,
                "generation": generation,
                "profile": profile.name,
                "issuer": profile.issuer,
                "state": state,
                "backend_name": mark(installation_id, cred_id),
                "expires_at": min(deadline, started + timedelta(seconds=profile.max_ttl)),
                "created_at": now,
                "updated_at": now,
                "next_attempt_at": now + MINT_REDRIVE if state == CredState.pending else None,
            }
        )
        made.append((profile, state))
        if state == CredState.pending:
            result.to_mint.append(cred_id)
        elif state == CredState.awaiting_approval and profile.approval_webhook:
            result.to_ask.append(cred_id)
        if state == CredState.denied:
            entries.append(
                _audit_row(
                    "denied",
                    actor=key.name,
                    tenant=tenant,
                    task_id=task.id,
                    credential_id=cred_id,
                    reason=code,
                    detail=clip(why, LONG_TEXT),
                    now=now,
                )
            )
        elif decision is not None and decision.policies:  # a set in force: its permit too
            entries.append(
                _audit_row(
                    "policy_allowed",
                    actor=key.name,
                    tenant=tenant,
                    task_id=task.id,
                    credential_id=cred_id,
                    detail=clip(f"mint {decision.reason}", LONG_TEXT),
                    now=now,
                )
            )
    if batch is None:
        write_batch(session, out)
    return made


def _make_task_ca(task: AnyTask, profiles: list[Profile], *, now: datetime, batch: _Batch) -> None:
    """The forward-mode CA of a task with proxy grants: for their upstream hosts only,
    valid until the task can no longer live (its profiles' smallest max_ttl)."""
    hosts = sorted({upstream_host(p.upstream) for p in profiles if isinstance(p, ProxyProfile)})
    if not hosts or task.started_at is None or task.max_ttl is None:
        return
    not_after = task.started_at + timedelta(seconds=task.max_ttl)
    issued = make_ca(hosts, label=task.id, not_after=not_after)
    batch.cas.append(
        {
            "task_id": task.id,
            "cert_pem": issued.cert_pem,
            "sealed_key": sealing.seal({"key": issued.key_pem}),
            "hosts": json.dumps(hosts),
            "not_after": not_after,
            "created_at": now,
        }
    )


def task_ca(session: Session, task_pk: str) -> TaskCA | None:
    return session.get(TaskCA, task_pk)


def mint_inputs(session: Session, cred_id: str) -> tuple[Credential, Task, str | None] | None:
    """A credential, its task and the task's CA certificate (if any), in one round trip:
    what a mint needs before it calls the backend."""
    row = session.execute(_MINT_INPUTS, {"p_id": cred_id}).first()
    return (row[0], row[1], row[2]) if row is not None else None


# Built once with a bound parameter: built per call, its cache key cost more than the read.
_MINT_INPUTS = (
    select(Credential, Task, TaskCA.cert_pem)
    .join(Task, col(Task.id) == col(Credential.task_id))
    .outerjoin(TaskCA, col(TaskCA.task_id) == col(Task.id))
    .where(col(Credential.id) == sqlalchemy.bindparam("p_id"))
)


def _parent_for(session: Session, key: ApiKey, parent_name: str | None) -> Task | None:
    if parent_name is None:
        return None
    parent = find_task(session, key.tenant or "", parent_name, lock=True)
    if parent is None or parent.owner_key_id != key.id:
        raise LedgerError(422, f"parent task {parent_name!r} is unknown", parent=parent_name)
    if parent.state != TaskState.running:
        raise LedgerError(422, f"parent task {parent_name!r} has ended", parent=parent_name)
    if parent.depth + 1 >= MAX_DEPTH:
        raise LedgerError(422, f"parent task {parent_name!r} is at the depth limit of {MAX_DEPTH}")
    children = session.exec(
        select(func.count()).select_from(Task).where(Task.parent_id == parent.id)
    ).one()
    if children >= MAX_CHILDREN:
        raise LedgerError(422, f"parent task {parent_name!r} has {MAX_CHILDREN} children already")
    return parent


def _heartbeat(
    session: Session, key: ApiKey, event: EventIn, task: AnyTask | None, now: datetime
) -> EventResult:
    if task is None:
        raise LedgerError(404, f"no task {event.subject!r}")
    result = EventResult(task=task, duplicate=False)
    max_duration = (event.data or {}).get("max_duration")
    if task.state != TaskState.running or max_duration is None or task.started_at is None:
        return result
    if task.max_ttl is not None and max_duration > task.max_ttl:
        raise LedgerError(
            422, f"max_duration {max_duration} passes the profiles' max_ttl of {task.max_ttl}"
        )
    deadline = task.started_at + timedelta(seconds=int(max_duration))
    if task.parent_id is not None:
        parent = session.get(Task, task.parent_id)
        if parent is not None and parent.deadline is not None:
            deadline = min(deadline, parent.deadline)
    if task.deadline is not None and deadline <= task.deadline:
        return result  # a deadline only moves forward
    refuse_unapproved_extension(session, task)
    _authorize_extend(session, key, task, int(max_duration), now)
    moved = session.exec(
        update(Task)
        .where(col(Task.id) == task.id, col(Task.state) == TaskState.running)
        .values(deadline=deadline)
    ).rowcount
    if moved:
        task.deadline = deadline
        ids = session.execute(
            update(Credential)
            .where(
                col(Credential.task_id) == task.id,
                col(Credential.state).in_(LIVE_CRED_STATES),
            )
            .values(expires_at=deadline, updated_at=now)
            .returning(col(Credential.id), col(Credential.state))
        ).all()
        result.to_extend = [i for i, state in ids if state == CredState.active]
        audit(
            session,
            "deadline_extended",
            actor=key.name,
            tenant=task.tenant,
            task_id=task.id,
            detail=deadline.isoformat(),
            now=now,
        )
    return result


def _authorize_extend(
    session: Session, key: ApiKey, task: AnyTask, max_duration: int, now: datetime
) -> None:
    """Ask the policy for every live profile of the task; one deny refuses (403)."""
    live = session.execute(
        select(Credential.profile, Credential.issuer)
        .where(Credential.task_id == task.id, col(Credential.state).in_(LIVE_CRED_STATES))
        .distinct()
        .order_by(col(Credential.profile))
    ).all()
    parent = session.get(Task, task.parent_id) if task.parent_id else None
    asks = [
        policy.Ask(
            action="extend",
            workload=task.workload,
            profile=profile,
            issuer=issuer,
            tenant=task.tenant,
            emitter=key.name,
            source=task.source,
            task=task.name,
            parent=parent.name if parent else None,
            max_duration=max_duration,
        )
        for profile, issuer in live
    ]
    denials = [(a, d) for a, d in zip(asks, policy.authorize(asks), strict=True) if not d.allowed]
    if not denials:
        return
    ask, decision = denials[0]
    error = LedgerError(
        403,
        f"policy denies extending profile {ask.profile!r} to {max_duration}s: {decision.reason}",
        profile=ask.profile,
        policies=list(decision.policies),
    )
    error.audit = [
        {
            "action": "extend_denied",
            "actor": key.name,
            "tenant": task.tenant,
            "task_id": task.id,
            "reason": "policy",
            "detail": clip(
                f"extend {a.profile} to {max_duration}s denied by policy: {d.reason}", LONG_TEXT
            ),
        }
        for a, d in denials
    ]
    raise error


def end_task(
    session: Session,
    task: AnyTask,
    state: TaskState,
    reason: str,
    *,
    actor: str,
    now: datetime,
    audits: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Running -> ended (CAS); its credentials and its children's go to revoking.

    The audit entries go to `audits` when given (the caller writes them), else in one
    INSERT here."""
    entries: list[dict[str, Any]] = [] if audits is None else audits
    if session.get_bind().dialect.name == "postgresql":
        # The task, its CA and its credentials in one round trip (_PG_END).
        rows = session.execute(
            _PG_END,
            {
                "b_task_id": task.id,
                "new_state": state,
                "at": now,
                "b_reason": reason,
                "b_redrive": now + REVOKE_REDRIVE,
            },
        ).all()
        if not rows:
            return []
        has_children = bool(rows[0].has_children)
        revoked = [(r.id, r.tenant, r.task_id) for r in rows if r.id is not None]
    else:
        # Whether a running child exists is read by this statement, after the task's row
        # lock is held: a child's start locks its parent, so none can appear meanwhile.
        ended = session.execute(
            _END_TASK, {"task_id": task.id, "new_state": state, "at": now}
        ).first()
        if ended is None:
            return []
        has_children = bool(ended.has_children)
        # Its forward-mode CA can sign nothing more: the key is destroyed with the end.
        session.execute(_SEAL_CA, {"ca_task_id": task.id})
        revoked = []
    if isinstance(task, Task):  # an ORM row: the database holds this already
        set_committed_value(task, "state", state)
        set_committed_value(task, "ended_at", now)
    else:
        task.state, task.ended_at = state, now
    entries.append(
        _audit_row(
            "task_ended", actor=actor, tenant=task.tenant, task_id=task.id, reason=reason, now=now
        )
    )
    if session.get_bind().dialect.name == "postgresql":
        entries.extend(_revoke_entries(revoked, reason=reason, actor=actor, now=now))
        revoke = [r[0] for r in revoked]
    else:
        revoke = request_revoke(
            session, task_id=task.id, reason=reason, actor=actor, now=now, audits=entries
        )
    if has_children:
        children = session.exec(
            select(Task).where(Task.parent_id == task.id, Task.state == TaskState.running)
        ).all()
        for child in children:
            revoke += end_task(
                session,
                child,
                TaskState.cancelled,
                "parent_ended",
                actor=actor,
                now=now,
                audits=entries,
            )
    if audits is None:
        write_audit(session, entries)
    return revoke


def _revoke_entries(rows: Any, *, reason: str, actor: str, now: datetime) -> list[dict[str, Any]]:
    """The `revoke_requested` entries of (credential id, tenant, task id) rows."""
    return [
        _audit_row(
            "revoke_requested",
            actor=actor,
            tenant=tenant,
            task_id=task_pk,
            credential_id=cred_id,
            reason=reason,
            now=now,
        )
        for cred_id, tenant, task_pk in rows
    ]


def request_revoke(
    session: Session,
    *,
    reason: str,
    actor: str,
    now: datetime,
    task_id: str | None = None,
    credential_id: str | None = None,
    audits: list[dict[str, Any]] | None = None,
) -> list[str]:
    """Live credentials (of a task, or one) -> revoking; returns their ids.

    The unclaimed secret is destroyed here: nobody may claim it any more, however long
    the revoke itself takes. The row is due again (`next_attempt_at`) in case the
    revoke's message is lost. The audit entries go to `audits` when given (the caller
    writes them), else in one INSERT here."""
    c = _CREDS.c
    query = sqlalchemy.update(_CREDS).where(c.state.in_(LIVE_CRED_STATES))
    if task_id is not None:
        query = query.where(c.task_id == task_id)
    if credential_id is not None:
        query = query.where(c.id == credential_id)
    rows = session.execute(
        query.values(
            state=CredState.revoking,
            revoke_reason=reason,
            revoke_requested_at=now,
            sealed_secret=None,
            next_attempt_at=now + REVOKE_REDRIVE,
            updated_at=now,
        ).returning(c.id, c.tenant, c.task_id)
    ).all()
    entries = _revoke_entries(rows, reason=reason, actor=actor, now=now)
    if audits is None:
        write_audit(session, entries)
    else:
        audits.extend(entries)
    return [r[0] for r in rows]


# --- kill switches -----------------------------------------------------------

SWITCH_FIELDS = ("tenant", "profile", "workload", "source")


def switches_in_force(session: Session, tenant: str | None = None) -> list[KillSwitch]:
    """The switches not lifted (those that can match `tenant`'s credentials, if given)."""
    query = select(KillSwitch).where(col(KillSwitch.lifted_at).is_(None))
    if tenant is not None:
        query = query.where(or_(col(KillSwitch.tenant).is_(None), col(KillSwitch.tenant) == tenant))
    return list(session.exec(query.order_by(col(KillSwitch.id))))


def switch_matches(switch: KillSwitch, task: AnyTask, profile: str) -> bool:
    wanted = (switch.tenant, switch.profile, switch.workload, switch.source)
    have = (task.tenant, profile, task.workload, task.source)
    return all(w is None or w == h for w, h in zip(wanted, have, strict=True))


def describe_match(switch: KillSwitch) -> str:
    return " ".join(f"{f}={getattr(switch, f)}" for f in SWITCH_FIELDS if getattr(switch, f))


def _switch_condition(switch: KillSwitch) -> list[Any]:
    """SQL conditions on Credential (joined with its Task) for one switch's match."""
    conditions: list[Any] = []
    for value, column in (
        (switch.tenant, Credential.tenant),
        (switch.profile, Credential.profile),
        (switch.workload, Task.workload),
        (switch.source, Task.source),
    ):
        if value is not None:
            conditions.append(column == value)
    return conditions


def _switch_in_force(tenant: str, profile: str, workload: str | None, source: str) -> Any:
    """EXISTS: a switch in force matches a credential with these (never changing) fields."""
    return exists().where(
        col(KillSwitch.lifted_at).is_(None),
        or_(col(KillSwitch.tenant).is_(None), col(KillSwitch.tenant) == tenant),
        or_(col(KillSwitch.profile).is_(None), col(KillSwitch.profile) == profile),
        or_(col(KillSwitch.workload).is_(None), col(KillSwitch.workload) == workload),
        or_(col(KillSwitch.source).is_(None), col(KillSwitch.source) == source),
    )


def throw_switch(
    session: Session, match: dict[str, str | None], *, actor: str, now: datetime
) -> KillSwitch:
    """A new switch in force: from its commit on, no matching credential is minted (the
    start refuses it, the activation re-checks). The caller commits, then revokes what
    matches with revoke_switched, a batch at a time."""
    if not any(match.get(f) for f in SWITCH_FIELDS):
        raise LedgerError(422, "a kill switch names at least one of " + ", ".join(SWITCH_FIELDS))
    switch = KillSwitch(
        created_at=now,
        created_by=actor,
        tenant=match.get("tenant") or None,
        profile=match.get("profile") or None,
        workload=match.get("workload") or None,
        source=match.get("source") or None,
    )
    session.add(switch)
    audit(
        session,
        "kill_switch",
        actor=actor,
        tenant=switch.tenant,
        reason="thrown",
        detail=f"{switch.id} {describe_match(switch)}",
        now=now,
    )
    return switch


@dataclass
class SwitchBatch:
    to_revoke: list[str]  # enqueue after the commit
    denied: int
    more: bool  # read again: the batch was full, or a row moved on meanwhile


def revoke_switched(
    session: Session, switch: KillSwitch, *, actor: str, now: datetime, limit: int = 500
) -> SwitchBatch:
    """One batch of what a switch matches: active -> revoking (reason `kill_switch`, the
    secret destroyed), pending and awaiting_approval -> denied.

    Rows locked by another transaction (an activation in flight) are waited for and
    re-checked: the state condition is on the update itself."""
    matching = (
        select(Credential.id)
        .join(Task, col(Task.id) == col(Credential.task_id))
        .where(col(Credential.state).in_(LIVE_CRED_STATES), *_switch_condition(switch))
        .limit(limit)
    )
    ids = list(session.exec(matching))
    if not ids:
        return SwitchBatch([], 0, more=False)
    reason = "kill_switch"
    detail = f"kill switch {switch.id}"
    revoking = session.execute(
        update(Credential)
        .where(col(Credential.id).in_(ids), col(Credential.state) == CredState.active)
        .values(
            state=CredState.revoking,
            revoke_reason=reason,
            revoke_requested_at=now,
            sealed_secret=None,
            next_attempt_at=now + REVOKE_REDRIVE,
            updated_at=now,
        )
        .returning(col(Credential.id), col(Credential.tenant), col(Credential.task_id))
        .execution_options(synchronize_session=False)
    ).all()
    denied = session.execute(
        update(Credential)
        .where(col(Credential.id).in_(ids), col(Credential.state).in_(WAITING_CRED_STATES))
        .values(state=CredState.denied, sealed_secret=None, next_attempt_at=None, updated_at=now)
        .returning(col(Credential.id), col(Credential.tenant), col(Credential.task_id))
        .execution_options(synchronize_session=False)
    ).all()
    for rows, action in ((revoking, "revoke_requested"), (denied, "denied")):
        for cred_id, tenant, task_pk in rows:
            audit(
                session,
                action,
                actor=actor,
                tenant=tenant,
                task_id=task_pk,
                credential_id=cred_id,
                reason=reason,
                detail=detail,
                now=now,
            )
    session.execute(
        update(KillSwitch)
        .where(col(KillSwitch.id) == switch.id)
        .values(
            revoking=KillSwitch.revoking + len(revoking), denied=KillSwitch.denied + len(denied)
        )
        .execution_options(synchronize_session=False)
    )
    # A row that moved on between the read and the update (an activation, a task's end)
    # is read again in the next batch.
    more = len(ids) == limit or len(revoking) + len(denied) < len(ids)
    return SwitchBatch([r[0] for r in revoking], len(denied), more=more)


def switch_progress(session: Session, switch: KillSwitch) -> dict[str, int]:
    """Where a switch's revocations stand: `remaining` still revoking, `revoked` done,
    `failed` given up, and `live` matching credentials not yet taken (0 once done)."""
    counts = dict.fromkeys(("remaining", "revoked", "failed"), 0)
    rows = session.execute(
        select(Credential.state, func.count())
        .join(Task, col(Task.id) == col(Credential.task_id))
        .where(
            col(Credential.revoke_reason) == "kill_switch",
            col(Credential.revoke_requested_at) >= switch.created_at,
            col(Credential.state).in_((CredState.revoking, CredState.revoked, CredState.failed)),
            *_switch_condition(switch),
        )
        .group_by(col(Credential.state))
    ).all()
    names = {CredState.revoking: "remaining", CredState.revoked: "revoked"}
    for state, n in rows:
        counts[names.get(state, "failed")] += n
    live = 0
    if switch.lifted_at is None:
        live = session.execute(
            select(func.count())
            .select_from(Credential)
            .join(Task, col(Task.id) == col(Credential.task_id))
            .where(col(Credential.state).in_(LIVE_CRED_STATES), *_switch_condition(switch))
        ).scalar_one()
    counts["live"] = live
    return counts


def lift_switch(session: Session, switch_id: str, *, actor: str, now: datetime) -> bool:
    done = session.execute(
        update(KillSwitch)
        .where(col(KillSwitch.id) == switch_id, col(KillSwitch.lifted_at).is_(None))
        .values(lifted_at=now, lifted_by=actor)
        .returning(col(KillSwitch.tenant))
    ).first()
    if done:
        audit(
            session,
            "kill_switch",
            actor=actor,
            tenant=done.tenant,
            reason="lifted",
            detail=switch_id,
            now=now,
        )
    return bool(done)


# --- rotation and cancel ---------------------------------------------------------


def latest_credential(session: Session, task_pk: str, grant: str) -> Credential | None:
    return session.exec(
        select(Credential)
        .where(Credential.task_id == task_pk, Credential.grant == grant)
        .order_by(col(Credential.generation).desc())
    ).first()


@dataclass
class Rotation:
    credential: Credential  # the new generation
    claim_generation: int
    to_revoke: list[str]
    to_mint: list[str]
    to_ask: list[str]


def rotate(
    session: Session,
    key: ApiKey,
    task: Task,
    grant: str,
    *,
    profiles: dict[str, Profile],
    installation_id: str,
    now: datetime,
) -> Rotation:
    """Revoke a grant's latest credential (reason `rotated`) and create the next
    generation, decided as a start decides it; the task's claim generation moves on, so
    every older claim token is refused. `task` is locked by the caller; the caller
    enqueues after its commit."""
    if task.state != TaskState.running:
        raise LedgerError(409, f"the task is {task.state}", state=task.state)
    old = latest_credential(session, task.id, grant)
    if old is None:
        raise LedgerError(404, f"task has no grant {grant!r}")
    profile = profiles.get(old.profile)
    if profile is None:
        raise LedgerError(409, f"profile {old.profile!r} is retired: nothing to mint")
    revoke = request_revoke(
        session, credential_id=old.id, reason="rotated", actor=key.name, now=now
    )
    generation = session.execute(
        update(Task)
        .where(col(Task.id) == task.id, col(Task.state) == TaskState.running)
        .values(claim_generation=col(Task.claim_generation) + 1)
        .returning(col(Task.claim_generation))
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if generation is None:
        raise LedgerError(409, "the task has ended")
    task.claim_generation = generation
    parent = session.get(Task, task.parent_id) if task.parent_id else None
    held: set[str] = set()
    if parent is not None:
        held = {
            c.profile
            for c in task_credentials(session, parent.id)
            if c.state in (CredState.pending, CredState.active)
        }
    max_duration = 1
    if task.deadline is not None and task.started_at is not None:
        max_duration = max(1, round((task.deadline - task.started_at).total_seconds()))
    result = EventResult(task=task, duplicate=False)
    issue_grants(
        session,
        key,
        task,
        [(grant, profile, old.generation + 1)],
        parent=parent,
        held=held,
        max_duration=max_duration,
        installation_id=installation_id,
        now=now,
        result=result,
    )
    session.flush()
    new = latest_credential(session, task.id, grant)
    assert new is not None
    audit(
        session,
        "rotated",
        actor=key.name,
        tenant=task.tenant,
        task_id=task.id,
        credential_id=new.id,
        reason="rotated",
        detail=f"replaces {old.id}; claim tokens before generation {generation} refused",
        now=now,
    )
    return Rotation(new, generation, revoke, result.to_mint, result.to_ask)


def cancel_task(session: Session, task: Task, *, actor: str, now: datetime) -> list[str]:
    """An operator ends a running task as `cancelled` (its emitter key is revoked, or its
    orchestrator gone); returns the credentials to revoke. 409 if it has ended."""
    if task.state != TaskState.running:
        raise LedgerError(409, f"the task is {task.state}", state=task.state)
    return end_task(session, task, TaskState.cancelled, "cancelled", actor=actor, now=now)


# --- approvals -----------------------------------------------------------

MAX_DECISION_REASON = 500


def refuse_unapproved_extension(session: Session, task: AnyTask) -> None:
    """A task with a grant that waits for, or holds, an approval keeps the deadline the
    operator saw: moving it needs a new approval (a new task), so refuse with 403."""
    gated = session.exec(
        select(Credential.grant)
        .where(
            Credential.task_id == task.id,
            or_(
                col(Credential.state) == CredState.awaiting_approval,
                col(Credential.approved_at).is_not(None)
                & col(Credential.state).in_((CredState.pending, CredState.active)),
            ),
        )
        .limit(1)
    ).first()
    if gated is not None:
        raise LedgerError(
            403,
            f"grant {gated!r} was approved (or awaits approval) for the task's current "
            "deadline; it cannot move without a new approval",
        )


def _decide(
    session: Session,
    cred_id: str,
    to: CredState,
    action: str,
    *,
    actor: str,
    reason: str | None,
    now: datetime,
) -> Credential | None:
    """awaiting_approval -> `to` (CAS), only while the task runs and its deadline is ahead;
    None otherwise."""
    running = select(Task.id).where(
        col(Task.state) == TaskState.running,
        or_(col(Task.deadline).is_(None), col(Task.deadline) > now),
    )
    values: dict[str, Any] = {"state": to, "updated_at": now}
    if to == CredState.pending:
        # A lost mint message is found again from the ledger, as for any pending row.
        values.update(approved_at=now, next_attempt_at=now + MINT_REDRIVE)
    done = session.exec(
        update(Credential)
        .where(
            col(Credential.id) == cred_id,
            col(Credential.state) == CredState.awaiting_approval,
            col(Credential.task_id).in_(running),
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not done:
        return None
    cred = session.get(Credential, cred_id)
    assert cred is not None
    session.refresh(cred)  # the update bypassed the identity map
    detail = reason[:MAX_DECISION_REASON] if reason else None
    return audit_credential(session, cred, action, actor=actor, detail=detail, now=now)


def approve(
    session: Session, cred_id: str, *, actor: str, reason: str | None, now: datetime
) -> Credential | None:
    """Awaiting approval -> pending: the caller enqueues the mint after its commit. The
    credential expires at the task's deadline as it stands now (heartbeats cannot move it,
    see refuse_unapproved_extension)."""
    cred = _decide(
        session, cred_id, CredState.pending, "approved", actor=actor, reason=reason, now=now
    )
    if cred is not None:
        task = session.get(Task, cred.task_id)
        if task is not None and task.deadline is not None and cred.expires_at is not None:
            cred.expires_at = min(cred.expires_at, task.deadline)
    return cred


def deny(
    session: Session, cred_id: str, *, actor: str, reason: str | None, now: datetime
) -> Credential | None:
    """Awaiting approval -> denied, for good: nothing is minted, the claim answers 410."""
    return _decide(
        session, cred_id, CredState.denied, "denied", actor=actor, reason=reason, now=now
    )


# --- deadlines -----------------------------------------------------------


def time_out_due(session: Session, *, now: datetime, limit: int = 500) -> list[str]:
    """End running tasks past their deadline (indexed on state, deadline)."""
    query = (
        select(Task)
        .where(Task.state == TaskState.running, col(Task.deadline) <= now)
        .order_by(col(Task.deadline))
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    revoke: list[str] = []
    for task in session.exec(query).all():
        revoke += end_task(session, task, TaskState.timed_out, "timeout", actor="system", now=now)
    return revoke


# --- minting -------------------------------------------------------------


def begin_mint(session: Session, cred_id: str, *, token: str, now: datetime) -> bool:
    """Take the mint lease of a pending credential for one delivery (`token`); False when
    another delivery holds a fresh lease: then this one must not touch the backend (a
    second mint would replace the first's password, or end its sessions).

    The lease lives in a table of its own, so taking it never waits for the credential's
    row lock. The row itself is touched, skipping a locked row (an ending task: the
    activation's compare-and-set settles that race), so that "young pending" means "in
    flight" to the reconciliation, and the re-drive waits for the lease to run out."""
    until = now + MINT_LEASE
    take, touch = _begin_mint_statements(session.get_bind().dialect.name)
    params = {"p_id": cred_id, "p_token": token, "p_until": until, "p_now": now}
    if session.execute(take, params).first() is None:
        return False
    session.execute(touch, params)
    return True


@lru_cache
def _begin_mint_statements(dialect: str) -> tuple[Any, Any]:
    """begin_mint's two statements, built once per dialect with bound parameters (built
    per call, their cache keys were a fifth of a mint's CPU). Core, on the tables."""
    lease = MintLease.__table__  # type: ignore[attr-defined]
    param = sqlalchemy.bindparam
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(lease).values(
        credential_id=param("p_id"), token=param("p_token"), until=param("p_until")
    )
    return _take_lease(stmt), _touch_pending()


def _take_lease(stmt: Any) -> Any:
    """A mint lease INSERT with begin_mint's conflict rule: a lease is taken over only
    once it ran out, or by the delivery holding it (its retries keep it)."""
    lease = stmt.table
    param = sqlalchemy.bindparam
    return stmt.on_conflict_do_update(
        index_elements=[lease.c.credential_id],
        set_={"token": stmt.excluded.token, "until": stmt.excluded.until},
        where=(lease.c.until <= param("p_now", type_=UTCDateTime()))
        | (lease.c.token == param("p_token")),
    ).returning(lease.c.token)


def _touch_pending(*also: Any) -> Any:
    """The pending row touched (unless locked: SKIP LOCKED), so that "young pending"
    means "in flight" and the re-drive waits for the lease to run out."""
    table = Credential.__table__  # type: ignore[attr-defined]
    param = sqlalchemy.bindparam
    unlocked = (
        sqlalchemy.select(table.c.id)
        .where(table.c.id == param("p_id"), table.c.state == CredState.pending.value)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return (
        update(table)
        .where(table.c.id == unlocked, *also)
        .values(
            updated_at=param("p_now", type_=UTCDateTime()),
            next_attempt_at=param("p_until", type_=UTCDateTime()),
        )
    )


def begin_mint_with_inputs(
    session: Session, cred_id: str, *, token: str, now: datetime
) -> tuple[Credential, Task, str | None, bool] | None:
    """mint_inputs() and, for a pending credential, begin_mint(): (credential, task, CA
    certificate, whether this delivery holds the lease), or None for no such credential.
    One statement on PostgreSQL (three round trips apart); on SQLite, the two calls."""
    if session.get_bind().dialect.name != "postgresql":
        inputs = mint_inputs(session, cred_id)
        if inputs is None:
            return None
        cred, task, ca = inputs
        leased = cred.state == CredState.pending and begin_mint(
            session, cred_id, token=token, now=now
        )
        return cred, task, ca, leased
    params = {"p_id": cred_id, "p_token": token, "p_until": now + MINT_LEASE, "p_now": now}
    row = session.execute(_BEGIN_MINT_WITH_INPUTS, params).first()
    if row is None:
        return None
    cred, task, ca, leased, touched = row
    if leased and not touched:
        # Taken but not touched: the row is locked (an ending task: the activation's
        # compare-and-set settles that) or no longer pending. The latter happens when
        # this statement waited on the lease of a delivery that activated and released
        # it meanwhile: its read is from before, so look again, and let go.
        state = session.execute(_CRED_STATE, {"p_id": cred_id}).scalar_one()
        if state != CredState.pending:
            _release_lease(session, cred_id, token)
            set_committed_value(cred, "state", state)
            return cred, task, ca, False
    return cred, task, ca, bool(leased)


def _begin_mint_with_inputs_statement() -> Any:
    """PostgreSQL: the lease taken for a credential pending in the statement's snapshot
    (INSERT ... SELECT WHERE, with begin_mint's conflict rule), the row touched only
    when the lease was taken and the row is still pending and not locked (FOR UPDATE
    sees the latest version), and mint_inputs' read, in one statement; whether it was
    leased and touched (begin_mint_with_inputs looks again when leased, not touched)."""
    lease = MintLease.__table__  # type: ignore[attr-defined]
    table = Credential.__table__  # type: ignore[attr-defined]
    param = sqlalchemy.bindparam
    pending = exists().where(table.c.id == param("p_id"), table.c.state == CredState.pending.value)
    stmt = postgresql.insert(lease).from_select(
        ["credential_id", "token", "until"],
        sqlalchemy.select(
            param("p_id", type_=lease.c.credential_id.type),
            param("p_token", type_=lease.c.token.type),
            param("p_until", type_=UTCDateTime()),
        ).where(pending),
    )
    take = _take_lease(stmt).cte("take")
    touch = (
        _touch_pending(exists(sqlalchemy.select(take.c.token))).returning(table.c.id).cte("touch")
    )
    leased = sqlalchemy.select(func.count()).select_from(take).scalar_subquery()
    touched = sqlalchemy.select(func.count()).select_from(touch).scalar_subquery()
    return _MINT_INPUTS.add_columns(leased.label("leased"), touched.label("touched")).add_cte(
        take, touch
    )


_CRED_STATE = sqlalchemy.select(Credential.__table__.c.state).where(  # type: ignore[attr-defined]
    Credential.__table__.c.id == sqlalchemy.bindparam("p_id")  # type: ignore[attr-defined]
)


_BEGIN_MINT_WITH_INPUTS = _begin_mint_with_inputs_statement()


def _lease_held(cred_id: str, token: str) -> Any:
    return exists().where(col(MintLease.credential_id) == cred_id, col(MintLease.token) == token)


def _activate_statement() -> Any:
    """activate()'s compare-and-set, built once with bound parameters: built per call,
    its large CASE statement was cache-keyed afresh every time (8 % of the worker's
    CPU). Core, on the table: no ORM bulk-update bookkeeping either."""
    table = Credential.__table__  # type: ignore[attr-defined]
    switch = KillSwitch.__table__  # type: ignore[attr-defined]
    lease = MintLease.__table__  # type: ignore[attr-defined]
    param = sqlalchemy.bindparam
    now = param("p_now", type_=UTCDateTime())

    def matches(column: Any, name: str) -> Any:
        return or_(column.is_(None), column == param(f"p_{name}", type_=column.type))

    # A switch in force that matches the credential's (never changing) fields; a NULL
    # workload matches only switches with none, as `column == None` did.
    switched = exists().where(
        switch.c.lifted_at.is_(None),
        matches(switch.c.tenant, "tenant"),
        matches(switch.c.profile, "profile"),
        matches(switch.c.workload, "workload"),
        matches(switch.c.source, "source"),
    )
    held = exists().where(
        lease.c.credential_id == param("p_cred_id"), lease.c.token == param("p_token")
    )

    def unless_switched(value: Any) -> Any:
        return case((switched, null()), else_=value)

    return (
        update(table)
        .where(
            table.c.id == param("p_cred_id"),
            table.c.state == CredState.pending.value,
            held,
        )
        .values(
            state=case(
                (switched, literal(CredState.revoking.value)),
                else_=literal(CredState.active.value),
            ),
            revoke_reason=case((switched, literal("kill_switch")), else_=null()),
            revoke_requested_at=case((switched, now), else_=null()),
            next_attempt_at=case(
                (switched, param("p_redrive_at", type_=UTCDateTime())), else_=null()
            ),
            backend_ref=param("p_ref", type_=table.c.backend_ref.type),
            backend_lease=param("p_lease", type_=table.c.backend_lease.type),
            token_digest=param("p_token_digest", type_=table.c.token_digest.type),
            sealed_secret=unless_switched(
                param("p_sealed_secret", type_=table.c.sealed_secret.type)
            ),
            expires_at=param("p_expires_at", type_=UTCDateTime()),
            minted_at=now,
            updated_at=now,
        )
        .returning(table.c.tenant, table.c.task_id, table.c.state)
    )


_ACTIVATE = _activate_statement()


# The audit columns an UPDATE ... RETURNING feeds (the export's two columns stay NULL).
_FED_AUDIT_COLUMNS = (
    "id",
    "at",
    "tenant",
    "actor",
    "action",
    "task_id",
    "credential_id",
    "reason",
    "detail",
)


def _activate_and_audit_statement() -> Any:
    """PostgreSQL: the activation's compare-and-set, its audit entry (`minted`, or
    `revoke_requested` when a kill switch matched) and the mint lease's release in one
    statement (one round trip instead of three). The lease is released whatever the
    outcome, as activate() does; the audit row exists exactly when the row moved."""
    done = _ACTIVATE.cte("done")
    lease = MintLease.__table__  # type: ignore[attr-defined]
    entries = AuditEntry.__table__  # type: ignore[attr-defined]
    param = sqlalchemy.bindparam
    released = (
        delete(lease)
        .where(lease.c.credential_id == param("p_cred_id"), lease.c.token == param("p_token"))
        .cte("released")
    )
    active = done.c.state == CredState.active.value
    audited = (
        sqlalchemy.insert(entries)
        .from_select(
            _FED_AUDIT_COLUMNS,
            sqlalchemy.select(
                param("p_audit_id", type_=entries.c.id.type),
                param("p_now", type_=UTCDateTime()),
                done.c.tenant,
                literal("system", entries.c.actor.type),
                case((active, literal("minted")), else_=literal("revoke_requested")),
                done.c.task_id,
                param("p_cred_id", type_=entries.c.credential_id.type),
                case((active, null()), else_=literal("kill_switch")),
                case((active, null()), else_=literal("minted after a kill switch")),
            ).select_from(done),
        )
        .cte("audited")
    )
    return sqlalchemy.select(done.c.tenant, done.c.task_id, done.c.state).add_cte(released, audited)


_ACTIVATE_AND_AUDIT = _activate_and_audit_statement()


def activate(
    session: Session,
    cred_id: str,
    *,
    token: str,
    ref: str,
    sealed_secret: str,
    expires_at: datetime,
    now: datetime,
    lease: str | None = None,
    token_digest: str | None = None,
    subject: tuple[str, str, str | None, str] | None = None,
) -> bool:
    """Pending -> active, for the delivery holding the mint lease; False when the task
    ended meanwhile (the caller revokes) or another delivery took the lease over.

    A kill switch in force that matches is re-checked in the same compare-and-set: then
    the row goes to revoking (reason `kill_switch`) with what was minted, and the
    caller revokes it at once. `subject` is what a switch matches on (the credential's
    tenant and profile, its task's workload and source: none of them ever changes),
    when the caller has read it already; else it is read here."""
    fields = (
        subject
        or session.execute(
            select(Credential.tenant, Credential.profile, Task.workload, Task.source)
            .join(Task, col(Task.id) == col(Credential.task_id))
            .where(col(Credential.id) == cred_id)
        ).first()
    )
    if fields is None:
        return False
    tenant, profile, workload, source = fields
    params = {
        "p_cred_id": cred_id,
        "p_token": token,
        "p_tenant": tenant,
        "p_profile": profile,
        "p_workload": workload,
        "p_source": source,
        "p_now": now,
        "p_redrive_at": now + REVOKE_REDRIVE,
        "p_ref": ref,
        "p_lease": lease,
        "p_token_digest": token_digest,
        "p_sealed_secret": sealed_secret,
        "p_expires_at": expires_at,
    }
    if session.get_bind().dialect.name == "postgresql":
        done = session.execute(_ACTIVATE_AND_AUDIT, {**params, "p_audit_id": new_id()}).first()
        if done is None:
            _keep_ref(session, cred_id, ref, now)
        return done is not None and done.state == CredState.active
    done = session.execute(_ACTIVATE, params).first()
    if done and done.state == CredState.active:
        audit(
            session,
            "minted",
            actor="system",
            tenant=done.tenant,
            task_id=done.task_id,
            credential_id=cred_id,
            now=now,
        )
    elif done:  # minted after a kill switch: taken back at once
        audit(
            session,
            "revoke_requested",
            actor="system",
            tenant=done.tenant,
            task_id=done.task_id,
            credential_id=cred_id,
            reason="kill_switch",
            detail="minted after a kill switch",
            now=now,
        )
    else:
        _keep_ref(session, cred_id, ref, now)
    _release_lease(session, cred_id, token)
    return done is not None and done.state == CredState.active


def _keep_ref(session: Session, cred_id: str, ref: str, now: datetime) -> None:
    """The task ended while minting: keep the ref so the revoke knows what to remove."""
    session.execute(
        update(Credential)
        .where(
            col(Credential.id) == cred_id,
            col(Credential.state) != CredState.pending,
            col(Credential.backend_ref).is_(None),
        )
        .values(backend_ref=ref, updated_at=now)
    )


def _release_lease(session: Session, cred_id: str, token: str) -> None:
    # Core, on the table: an ORM delete matched it against the session first.
    lease = MintLease.__table__  # type: ignore[attr-defined]
    session.execute(delete(lease).where(lease.c.credential_id == cred_id, lease.c.token == token))


def mark_mint_failed(
    session: Session, cred_id: str, error: str, *, token: str, now: datetime
) -> bool:
    done = session.exec(
        update(Credential)
        .where(col(Credential.id) == cred_id, col(Credential.state) == CredState.pending)
        .values(
            state=CredState.failed,
            last_error=clip(error, LONG_TEXT),
            next_attempt_at=None,
            updated_at=now,
        )
    ).rowcount
    _release_lease(session, cred_id, token)
    if done:
        audit_credential(
            session, cred_id, "mint_failed", actor="system", detail=clip(error), now=now
        )
    return bool(done)


# --- revoking ------------------------------------------------------------


def revoke_failed(
    session: Session, cred_id: str, error: str, *, retry_in: float, now: datetime
) -> int:
    """Count a failed attempt, due again after its retry (should that message be lost
    too); returns the attempts so far."""
    attempts = session.execute(
        update(Credential)
        .where(col(Credential.id) == cred_id, col(Credential.state) == CredState.revoking)
        .values(
            attempts=Credential.attempts + 1,
            last_error=clip(error, LONG_TEXT),
            next_attempt_at=now + timedelta(seconds=retry_in) + REVOKE_REDRIVE,
            updated_at=now,
        )
        .returning(col(Credential.attempts))
    ).scalar_one_or_none()
    return attempts or 0


# What a revoke reads of a row and what it reports of it (metrics, log): nothing secret.
_REVOKE_COLUMNS = (
    "id",
    "tenant",
    "task_id",
    "profile",
    "issuer",
    "backend_name",
    "backend_ref",
    "attempts",
    "revoke_reason",
    "revoke_requested_at",
)


@lru_cache
def _take_revokes_statement(lock: bool) -> Any:
    """take_revokes' query, built once with bound parameters: building and cache-keying
    it afresh per call cost about 5 % of the worker's CPU."""
    table = Credential.__table__  # type: ignore[attr-defined]
    cred_id: Any = sqlalchemy.bindparam("cred_id")
    query = (
        sqlalchemy.select(table.c.state, *(table.c[name] for name in _REVOKE_COLUMNS))
        .where(
            or_(
                table.c.id == cred_id,
                (table.c.state == CredState.revoking.value)
                & (table.c.next_attempt_at <= sqlalchemy.bindparam("due")),
            )
        )
        .order_by(case((table.c.id == cred_id, 0), else_=1), table.c.next_attempt_at)
        .limit(sqlalchemy.bindparam("limit"))
    )
    return query.with_for_update(skip_locked=True) if lock else query


def take_revokes(
    session: Session, cred_id: str, *, now: datetime, limit: int
) -> tuple[str | None, list[Credential]]:
    """`cred_id`'s state (None: not found, or held by another step) and the revoking
    rows this worker step acts on, locked until its commit: `cred_id` (first) if it is
    revoking, and up to `limit - 1` others due for an attempt (their backoff over:
    `next_attempt_at` is that time plus REVOKE_REDRIVE), oldest first, so a burst of
    ends is revoked in batches. Rows another step holds are skipped: that step records
    them. One statement; transient Credential objects (not in the session)."""
    query = _take_revokes_statement(session.get_bind().dialect.name == "postgresql")
    params = {"cred_id": cred_id, "due": now + REVOKE_REDRIVE, "limit": limit}
    state: str | None = None
    rows = []
    for row in session.execute(query, params):
        if row.id == cred_id:
            state = row.state
        if row.state == CredState.revoking:
            rows.append(Credential(**row._mapping))
    return state, rows


def mark_revoked_many(
    session: Session, rows: list[Credential], *, now: datetime
) -> list[Credential]:
    """Revoking -> revoked for rows this step holds (take_revokes), the secrets
    destroyed, with their audit entries; returns those moved (with revoked_at set).
    One statement on PostgreSQL (the UPDATE feeds the audit INSERT); two on SQLite."""
    if not rows:
        return []
    ids = [row.id for row in rows]
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        # Each entry's id taken now, in the batch's order (the export's order).
        params = {"ids": ids, "audit_ids": [new_id() for _ in rows], "now": now}
        done = set(session.execute(_REVOKED_AND_AUDIT, params).scalars())
    else:
        done = set(session.execute(_MARK_REVOKED, {"ids": ids, "now": now}).scalars())
    moved = [row for row in rows if row.id in done]
    for row in moved:
        row.state, row.revoked_at = CredState.revoked, now
    if not postgres:  # PostgreSQL wrote them with the UPDATE
        write_audit(
            session,
            [
                _audit_row(
                    "revoked",
                    actor="system",
                    now=now,
                    tenant=row.tenant,
                    task_id=row.task_id,
                    credential_id=row.id,
                    reason=row.revoke_reason,
                )
                for row in moved
            ],
        )
    return moved


def _mark_revoked_statement(ids: Any) -> Any:
    table = Credential.__table__  # type: ignore[attr-defined]
    now = sqlalchemy.bindparam("now", type_=UTCDateTime())
    return (
        update(table)
        .where(ids, table.c.state == CredState.revoking.value)
        .values(
            state=CredState.revoked.value,
            revoked_at=now,
            sealed_secret=None,
            last_error=None,
            next_attempt_at=None,
            updated_at=now,
        )
        .returning(table.c.id, table.c.tenant, table.c.task_id, table.c.revoke_reason)
    )


_MARK_REVOKED = _mark_revoked_statement(
    _CREDS.c.id.in_(sqlalchemy.bindparam("ids", expanding=True))
)


def _revoked_and_audit_statement() -> Any:
    """PostgreSQL: the rows moved to revoked feed their `revoked` entries, each with the
    id taken for it (arrays: one constant text whatever the batch's size)."""
    entries = AuditEntry.__table__  # type: ignore[attr-defined]
    text_array = postgresql.ARRAY(sqlalchemy.String)
    ids = sqlalchemy.bindparam("ids", type_=text_array)
    done = _mark_revoked_statement(_CREDS.c.id == sqlalchemy.func.any(ids)).cte("done")
    pairs = sqlalchemy.func.unnest(ids, sqlalchemy.bindparam("audit_ids", type_=text_array))
    given = pairs.table_valued("cred", "audit_id").render_derived(name="given")
    return (
        sqlalchemy.insert(entries)
        .from_select(
            _FED_AUDIT_COLUMNS,
            sqlalchemy.select(
                given.c.audit_id,
                sqlalchemy.bindparam("now", type_=UTCDateTime()),
                done.c.tenant,
                literal("system", entries.c.actor.type),
                literal("revoked", entries.c.action.type),
                done.c.task_id,
                done.c.id,
                done.c.revoke_reason,
                null(),
            )
            .select_from(done.join(given, given.c.cred == done.c.id))
            .order_by(given.c.audit_id),
        )
        .add_cte(done, nest_here=True)
        .returning(entries.c.credential_id)
    )


_REVOKED_AND_AUDIT = _revoked_and_audit_statement()


def extend_failed(session: Session, cred_id: str, error: str, *, now: datetime) -> bool:
    """A heartbeat's extension the backend refused for good: recorded (last_error, an
    audit entry). The credential stays active; the backend ends it at the old expiry."""
    done = session.exec(
        update(Credential)
        .where(col(Credential.id) == cred_id, col(Credential.state) == CredState.active)
        .values(last_error=clip(f"extend: {error}", LONG_TEXT), updated_at=now)
    ).rowcount
    if done:
        audit_credential(
            session, cred_id, "extend_failed", actor="system", detail=clip(error), now=now
        )
    return bool(done)


# --- claiming ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimedCredential:
    """What a claim read of a credential (no ORM object: the claim path is Core)."""

    id: str
    tenant: str
    task_id: str
    issuer: str
    profile: str
    minted_at: datetime | None


_claim_now = sqlalchemy.bindparam("now", type_=_CREDS.c.updated_at.type)
_claim_consumed = (
    update(_CREDS)
    .where(
        _CREDS.c.id == sqlalchemy.bindparam("cred"),
        _CREDS.c.state == CredState.active.value,
        _CREDS.c.claimed_at.is_(None),
        _CREDS.c.sealed_secret == sqlalchemy.bindparam("sealed"),
    )
    .values(claimed_at=_claim_now, sealed_secret=None, updated_at=_claim_now)
    .returning(_CREDS.c.id, _CREDS.c.tenant, _CREDS.c.task_id)
)


def _claimed_entry(consumed: Any) -> Any:
    """The `claimed` audit INSERT fed by a consuming UPDATE's RETURNING (a CTE): the
    audit row exists exactly when the secret was consumed."""
    return (
        sqlalchemy.insert(_AUDIT)
        .from_select(
            ["id", "at", "tenant", "actor", "action", "task_id", "credential_id", "detail"],
            sqlalchemy.select(
                sqlalchemy.bindparam("audit_id", type_=_AUDIT.c.id.type),
                sqlalchemy.bindparam("now", type_=_AUDIT.c.at.type),
                consumed.c.tenant,
                sqlalchemy.bindparam("actor", type_=_AUDIT.c.actor.type),
                literal("claimed", _AUDIT.c.action.type),
                consumed.c.task_id,
                consumed.c.id,
                sqlalchemy.bindparam("detail", type_=_AUDIT.c.detail.type),
            ),
        )
        .returning(_AUDIT.c.id)
    )


# PostgreSQL: the consuming UPDATE feeds the audit INSERT, one statement, one round trip.
_consumed_cte = _claim_consumed.cte("consumed")
_TAKE_AND_AUDIT = _claimed_entry(_consumed_cte).add_cte(_consumed_cte, nest_here=True)
_AUDIT_CLAIMED = sqlalchemy.insert(_AUDIT).values(action="claimed")

# A claim's read: the task and its grant's latest credential, one Core statement built
# once (no ORM entities, no identity map, the compiled form cached).
CLAIM_READ = (
    sqlalchemy.select(
        _TASKS.c.tenant.label("task_tenant"),
        _TASKS.c.name.label("task_name"),
        _TASKS.c.workload,
        _TASKS.c.claim_generation,
        _TASKS.c.state.label("task_state"),
        _CREDS.c.id,
        _CREDS.c.tenant,
        _CREDS.c.task_id,
        _CREDS.c.issuer,
        _CREDS.c.profile,
        _CREDS.c.state,
        _CREDS.c.claimed_at,
        _CREDS.c.minted_at,
        _CREDS.c.expires_at,
        _CREDS.c.sealed_secret,
        _CREDS.c.grant,
    )
    .select_from(
        _TASKS.outerjoin(
            _CREDS,
            sqlalchemy.and_(
                _CREDS.c.task_id == _TASKS.c.id,
                _CREDS.c.grant == sqlalchemy.bindparam("p_grant"),
            ),
        )
    )
    .where(_TASKS.c.id == sqlalchemy.bindparam("p_task"))
    .order_by(_CREDS.c.generation.desc())
    .limit(1)
)


def _read_and_take_statement(*, by_subject: bool) -> Any:
    """PostgreSQL: the claim's read, and in the same statement the consume with its
    `claimed` entry when the read shows a plain claim that succeeds (the task running
    under this tenant and name, the claimant its holder, the credential active and
    unclaimed, its profile not one that asks policy again at claim). The answer is the
    read's row plus `taken`; nothing is written otherwise. A row a concurrent revoke or
    claim changed is re-checked by the UPDATE itself, so `taken` is never stale. The
    parameters are named `p_*`: one named like a credentials column (`tenant`, `grant`)
    would be taken by SQLAlchemy as one more SET of the UPDATE."""
    read = CLAIM_READ.cte("read")
    holder = (
        read.c.workload == sqlalchemy.bindparam("p_subject")
        if by_subject
        else read.c.claim_generation == sqlalchemy.bindparam("p_generation")
    )
    taken = (
        update(_CREDS)
        .where(
            _CREDS.c.id == read.c.id,
            read.c.task_tenant == sqlalchemy.bindparam("p_tenant"),
            read.c.task_name == sqlalchemy.bindparam("p_task_name"),
            read.c.task_state == TaskState.running.value,
            holder,
            read.c.profile
            != sqlalchemy.all_(
                sqlalchemy.bindparam("p_asks_again", type_=postgresql.ARRAY(sqlalchemy.String))
            ),
            _CREDS.c.state == CredState.active.value,
            _CREDS.c.claimed_at.is_(None),
            _CREDS.c.sealed_secret == read.c.sealed_secret,
        )
        .values(claimed_at=_claim_now, sealed_secret=None, updated_at=_claim_now)
        .returning(_CREDS.c.id, _CREDS.c.tenant, _CREDS.c.task_id)
        .cte("taken")
    )
    entry = _claimed_entry(taken).cte("entry")
    return sqlalchemy.select(
        *read.c,
        sqlalchemy.exists(sqlalchemy.select(taken.c.id)).label("taken"),
    ).add_cte(entry)


_READ_AND_TAKE_BY_TOKEN = _read_and_take_statement(by_subject=False)
_READ_AND_TAKE_BY_SUBJECT = _read_and_take_statement(by_subject=True)


def read_for_claim(
    conn: sqlalchemy.Connection,
    *,
    task_pk: str,
    grant: str,
    tenant: str,
    task_name: str,
    generation: int,
    subject: str | None,
    asks_again: list[str],
    actor: str,
    now: datetime,
    detail: str | None = None,
) -> tuple[Any, bool]:
    """A claim's read (the `CLAIM_READ` row, None without the task) and whether the
    secret was consumed with it (PostgreSQL, one statement; `asks_again` names the
    profiles whose claims ask policy again, never consumed here). Not consumed means
    the caller decides from the row, and consumes with `take_secret` if it may. The
    caller commits only once it has decrypted the row's sealed secret, and rolls back
    otherwise: a secret that cannot be decrypted is never destroyed."""
    if conn.dialect.name != "postgresql":  # SQLite: no UPDATE in a CTE
        return conn.execute(CLAIM_READ, {"p_task": task_pk, "p_grant": grant}).first(), False
    row = conn.execute(
        _READ_AND_TAKE_BY_TOKEN if subject is None else _READ_AND_TAKE_BY_SUBJECT,
        {
            "p_task": task_pk,
            "p_grant": grant,
            "p_tenant": tenant,
            "p_task_name": task_name,
            "p_generation": generation,
            "p_subject": subject,
            "p_asks_again": asks_again,
            "now": now,
            "audit_id": new_id(),
            "actor": actor,
            "detail": detail,
        },
    ).first()
    return row, bool(row is not None and row.taken)


def take_secret(
    conn: sqlalchemy.Connection,
    *,
    credential_id: str,
    sealed_secret: str,
    actor: str,
    now: datetime,
    detail: str | None = None,
) -> bool:
    """Consume the sealed secret the caller read, with its `claimed` audit entry; False
    when the row moved on meanwhile (another claim, a revoke). The caller decrypts the
    secret next and commits only if it could, rolling back otherwise: a secret that
    cannot be decrypted is never destroyed."""
    params = {
        "cred": credential_id,
        "sealed": sealed_secret,
        "now": now,
        "audit_id": new_id(),
        "actor": actor,
        "detail": detail,
    }
    if conn.dialect.name == "postgresql":
        return conn.execute(_TAKE_AND_AUDIT, params).first() is not None
    row = conn.execute(_claim_consumed, params).first()  # SQLite: no UPDATE in a CTE
    if row is None:
        return False
    conn.execute(
        _AUDIT_CLAIMED,
        {
            "id": params["audit_id"],
            "at": now,
            "tenant": row.tenant,
            "actor": actor,
            "task_id": row.task_id,
            "credential_id": row.id,
            "detail": detail,
        },
    )
    return True


def record_second_claim(
    session: Session, cred: ClaimedCredential, *, actor: str, now: datetime
) -> None:
    audit(
        session,
        "second_claim",
        actor=actor,
        tenant=cred.tenant,
        task_id=cred.task_id,
        credential_id=cred.id,
        detail="claim of an already claimed credential",
        now=now,
    )


# --- re-drive --------------------------------------------------------------


def redrive_due(
    session: Session, *, now: datetime, limit: int = 500
) -> tuple[list[str], list[str]]:
    """(pending, revoking) credential ids due again (`next_attempt_at` passed), each
    pushed to its next due time; the caller enqueues them after its commit. Rows locked
    by another transaction are skipped: they are moving on."""
    query = (
        select(Credential.id, Credential.state)
        .where(
            col(Credential.next_attempt_at) <= now,
            col(Credential.state).in_((CredState.pending, CredState.revoking)),
        )
        .order_by(col(Credential.next_attempt_at))
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    rows = session.exec(query).all()
    pending = [i for i, s in rows if s == CredState.pending]
    revoking = [i for i, s in rows if s == CredState.revoking]
    for ids, wait in ((pending, MINT_REDRIVE), (revoking, REVOKE_REDRIVE)):
        if ids:
            session.execute(
                update(Credential)
                .where(col(Credential.id).in_(ids))
                .values(next_attempt_at=now + wait)
            )
    return pending, revoking


def stuck_credentials(
    session: Session, *, older_than: datetime, limit: int = 500
) -> tuple[list[str], list[str]]:
    """(pending, revoking) credential ids untouched since `older_than`."""
    rows = session.exec(
        select(Credential.id, Credential.state)
        .where(
            or_(
                col(Credential.state) == CredState.pending,
                col(Credential.state) == CredState.revoking,
            ),
            col(Credential.updated_at) < older_than,
        )
        .limit(limit)
    ).all()
    pending = [i for i, s in rows if s == CredState.pending]
    revoking = [i for i, s in rows if s == CredState.revoking]
    return pending, revoking


def touch(session: Session, cred_ids: list[str], *, now: datetime) -> None:
    """Mark stuck rows as re-driven now. Their mint leases go: a row untouched for
    longer than a lease has no mint in flight, and the next delivery must be let in."""
    if cred_ids:
        session.execute(
            update(Credential)
            .where(col(Credential.id).in_(cred_ids))
            .values(updated_at=now, next_attempt_at=now + REVOKE_REDRIVE)
        )
        session.execute(delete(MintLease).where(col(MintLease.credential_id).in_(cred_ids)))


def revoke_gave_up(
    session: Session, cred_id: str, error: str, *, now: datetime
) -> Credential | None:
    """Revoking -> failed after a permanent error: recorded as such, not retried forever.

    The reconciliation still revokes the object if the backend shows it (a failed
    row holds nothing for a running task)."""
    done = session.exec(
        update(Credential)
        .where(col(Credential.id) == cred_id, col(Credential.state) == CredState.revoking)
        .values(
            state=CredState.failed,
            attempts=Credential.attempts + 1,
            last_error=clip(f"permanent: {error}", LONG_TEXT),
            sealed_secret=None,
            next_attempt_at=None,
            updated_at=now,
        )
    ).rowcount
    if not done:
        return None
    cred = session.get(Credential, cred_id)
    assert cred is not None
    audit_credential(
        session,
        cred,
        "revoke_failed",
        actor="system",
        reason=cred.revoke_reason,
        detail=clip(error),
        now=now,
    )
    return cred


# --- reconciliation ----------------------------------------------------------


@dataclass(frozen=True)
class HeldRow:
    """A credential as the reconciliation compares it with a backend."""

    id: str
    tenant: str
    task_id: str
    state: str
    profile: str
    backend_name: str
    backend_ref: str | None
    updated_at: datetime
    minted_at: datetime | None
    expires_at: datetime | None
    task_state: str


# sqlalchemy's select: sqlmodel's is typed for at most four columns.
_HELD_COLUMNS = (
    col(Credential.id),
    col(Credential.tenant),
    col(Credential.task_id),
    col(Credential.state),
    col(Credential.profile),
    col(Credential.backend_name),
    col(Credential.backend_ref),
    col(Credential.updated_at),
    col(Credential.minted_at),
    col(Credential.expires_at),
    col(Task.state),
)


def held_rows(session: Session, ids: list[str]) -> dict[str, HeldRow]:
    """The credentials (with their task's state) of these ids: primary-key lookups."""
    if not ids:
        return {}
    rows = session.execute(
        sqlalchemy.select(*_HELD_COLUMNS)
        .join(Task, col(Task.id) == col(Credential.task_id))
        .where(col(Credential.id).in_(ids))
    ).all()
    return {r[0]: HeldRow(*r) for r in rows}


def active_minted_before(
    session: Session,
    *,
    profiles: list[str],
    before: datetime,
    after: tuple[datetime, str] | None = None,
    limit: int = 500,
) -> list[HeldRow]:
    """Active credentials of these profiles minted before `before`, a batch at a time.

    Walks the (state, updated_at) index from `after` (the last row's updated_at, id):
    the cost grows with the active credentials, not with the ledger's history."""
    query = (
        sqlalchemy.select(*_HELD_COLUMNS)
        .join(Task, col(Task.id) == col(Credential.task_id))
        .where(
            col(Credential.state) == CredState.active,
            col(Credential.profile).in_(profiles),
            col(Credential.minted_at) < before,
        )
        .order_by(col(Credential.updated_at), col(Credential.id))
        .limit(limit)
    )
    if after is not None:
        at, last_id = after
        query = query.where(
            or_(
                col(Credential.updated_at) > at,
                (col(Credential.updated_at) == at) & (col(Credential.id) > last_id),
            )
        )
    return [HeldRow(*r) for r in session.execute(query).all()]


def mark_vanished(session: Session, cred_id: str, detail: str, *, now: datetime) -> bool:
    """Active -> revoked, reason `vanished`: the backend no longer holds it and Leasehold
    did not remove it (expired, or removed by someone else); `detail` says where. The
    secret is destroyed: a claim must not hand out a dead one."""
    done = session.exec(
        update(Credential)
        .where(col(Credential.id) == cred_id, col(Credential.state) == CredState.active)
        .values(
            state=CredState.revoked,
            revoke_reason="vanished",
            revoked_at=now,
            sealed_secret=None,
            last_error=clip(detail, LONG_TEXT),
            next_attempt_at=None,
            updated_at=now,
        )
    ).rowcount
    if done:
        audit_credential(
            session,
            cred_id,
            "vanished",
            actor="reconcile",
            reason="vanished",
            detail=clip(detail),
            now=now,
        )
    return bool(done)


def record_swept(
    session: Session,
    action: str,
    *,
    reason: str,
    row: HeldRow | None,
    credential_id: str | None,
    detail: str,
    now: datetime,
) -> None:
    """An audit entry for what the reconciliation revoked in a backend by itself."""
    audit(
        session,
        action,
        actor="reconcile",
        tenant=row.tenant if row else None,
        task_id=row.task_id if row else None,
        credential_id=credential_id,
        reason=reason,
        detail=clip(detail, LONG_TEXT),
        now=now,
    )


def start_sweep(session: Session, *, now: datetime, trigger: str) -> str:
    sweep = Sweep(started_at=now, detail={"trigger": trigger})
    session.add(sweep)
    session.flush()
    return sweep.id


def finish_sweep(
    session: Session,
    sweep_id: str,
    *,
    counts: dict[str, int],
    detail: dict[str, Any],
    now: datetime,
) -> Sweep | None:
    session.execute(
        update(Sweep)
        .where(col(Sweep.id) == sweep_id)
        .values(finished_at=now, detail=detail, **counts)
    )
    return session.get(Sweep, sweep_id)


# --- the audit export ------------------------------------------------------------


def audit_export_waiting(session: Session) -> bool:
    """Whether any entry waits for the export: one index probe (exported_seq IS NULL)."""
    table = AuditEntry.__table__  # type: ignore[attr-defined]
    query = sqlalchemy.select(literal(1)).where(table.c.exported_seq.is_(None)).limit(1)
    return session.execute(query).first() is not None


def audit_export_head(session: Session) -> tuple[int, str | None]:
    """The last exported entry's (seq, hash): (0, None) before the first export."""
    row = session.exec(
        select(AuditEntry.exported_seq, AuditEntry.export_hash)
        .where(col(AuditEntry.exported_seq).is_not(None))
        .order_by(col(AuditEntry.exported_seq).desc())
        .limit(1)
    ).first()
    return (int(row[0]), row[1]) if row and row[0] is not None else (0, None)


_MARK_EXPORTED = sqlalchemy.text(
    "UPDATE audit SET exported_seq = m.seq, export_hash = m.hash"
    " FROM unnest(CAST(:ids AS text[]), CAST(:seqs AS bigint[]), CAST(:hashes AS text[]))"
    " AS m(id, seq, hash)"
    " WHERE audit.id = m.id AND audit.exported_seq IS NULL RETURNING audit.id"
)


def mark_exported(session: Session, marks: list[tuple[str, int, str]]) -> None:
    """Record (id, seq, hash) of entries written to the export: compare-and-set on NULL,
    so an entry is marked once; anything else means a second exporter, and fails."""
    if not marks:
        return
    if session.get_bind().dialect.name == "postgresql":
        # One statement for the batch (it was one per entry: a third of the worker's
        # statements), the same compare-and-set per row; what did not match is named.
        # Arrays, not a VALUES list: a VALUES with data has no cache key, so SQLAlchemy
        # compiled it afresh on every batch.
        ids, seqs, hashes = (list(column) for column in zip(*marks, strict=True))
        marked = set(
            session.execute(_MARK_EXPORTED, {"ids": ids, "seqs": seqs, "hashes": hashes}).scalars()
        )
        missed = [entry_id for entry_id, _, _ in marks if entry_id not in marked]
        if missed:
            raise LedgerError(409, f"audit entry {missed[0]} was not waiting for export")
        return
    for entry_id, seq, digest in marks:
        done = session.exec(
            update(AuditEntry)
            .where(col(AuditEntry.id) == entry_id, col(AuditEntry.exported_seq).is_(None))
            .values(exported_seq=seq, export_hash=digest)
            # Not matched against the batch the exporter holds in the session: that made
            # each mark O(batch), the export O(batch^2).
            .execution_options(synchronize_session=False)
        ).rowcount
        if done != 1:
            raise LedgerError(409, f"audit entry {entry_id} was not waiting for export")


# --- retention -----------------------------------------------------------------


def purge_ended(session: Session, *, before: datetime, limit: int) -> tuple[int, int]:
    """Delete tasks that ended before `before` and whose credentials hold nothing
    any more, with those credentials; returns (tasks, credentials) deleted.
    The audit trail is kept."""
    unsettled = (
        select(Credential.id)
        .where(Credential.task_id == Task.id, col(Credential.state).not_in(SETTLED_CRED_STATES))
        .exists()
    )
    ids = list(
        session.exec(
            select(Task.id)
            .where(col(Task.ended_at) < before, Task.state != TaskState.running, ~unsettled)
            .order_by(col(Task.ended_at))
            .limit(limit)
        )
    )
    if not ids:
        return 0, 0
    gone = select(Credential.id).where(col(Credential.task_id).in_(ids))
    session.execute(delete(MintLease).where(col(MintLease.credential_id).in_(gone)))
    session.execute(delete(TaskCA).where(col(TaskCA.task_id).in_(ids)))
    creds = session.exec(delete(Credential).where(col(Credential.task_id).in_(ids))).rowcount
    session.execute(delete(Task).where(col(Task.id).in_(ids)))
    return len(ids), creds


def purge_audit(session: Session, *, before: datetime, limit: int) -> int:
    """Delete audit entries older than `before` that are in the export already; the
    chain's head stays, the exporter continues from it."""
    head, _ = audit_export_head(session)
    ids = list(
        session.exec(
            select(AuditEntry.id)
            .where(
                col(AuditEntry.at) < before,
                col(AuditEntry.exported_seq).is_not(None),
                col(AuditEntry.exported_seq) < head,
            )
            .limit(limit)
        )
    )
    if ids:
        session.execute(delete(AuditEntry).where(col(AuditEntry.id).in_(ids)))
    return len(ids)


def purge_events(session: Session, *, before: datetime, limit: int) -> int:
    """Delete events received before `before` (their idempotency window is over)."""
    ids = list(session.exec(select(Event.id).where(col(Event.received_at) < before).limit(limit)))
    if ids:
        session.execute(delete(Event).where(col(Event.id).in_(ids)))
    return len(ids)
