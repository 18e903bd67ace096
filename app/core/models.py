"""The ledger's tables. State changes go through app.ledger only."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Index,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on PostgreSQL and SQLite alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """Time-ordered id: newest-first lists sort and page by it."""
    return f"{time.time_ns():016x}{os.urandom(6).hex()}"


def _ts(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable))


class TaskState(StrEnum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"


class CredState(StrEnum):
    pending = "pending"
    awaiting_approval = "awaiting_approval"
    active = "active"
    revoking = "revoking"
    revoked = "revoked"
    denied = "denied"
    failed = "failed"


# The credential-state sets, defined here once.
WAITING_CRED_STATES = (CredState.pending, CredState.awaiting_approval)  # nothing minted yet
LIVE_CRED_STATES = (*WAITING_CRED_STATES, CredState.active)  # held for a running task
# Not settled: the ledger still owes work (a mint, an approval or a revoke).
UNSETTLED_CRED_STATES = (*LIVE_CRED_STATES, CredState.revoking)
SETTLED_CRED_STATES = (CredState.revoked, CredState.denied, CredState.failed)


class Role(StrEnum):
    emitter = "emitter"
    operator = "operator"
    admin = "admin"


class Installation(SQLModel, table=True):
    __tablename__ = "installation"

    id: str = Field(primary_key=True, max_length=64)
    label: str = Field(max_length=128)
    created_at: datetime = _ts(nullable=False)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: str = Field(max_length=128, unique=True)
    role: str = Field(max_length=16)
    tenant: str | None = Field(default=None, max_length=128)
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts(nullable=False)
    revoked_at: datetime | None = _ts()
    expires_at: datetime | None = _ts()  # None: never; past it the key answers 401
    last_used_at: datetime | None = _ts()  # kept to the minute (app.api.auth)
    # An emitter's scope (app/authority/scope.py); None means no limit.
    sources: list[str] | None = Field(default=None, sa_column=Column(JSON))
    workloads: list[str] | None = Field(default=None, sa_column=Column(JSON))
    profiles: list[str] | None = Field(default=None, sa_column=Column(JSON))


class DashboardSession(SQLModel, table=True):
    """A signed-in dashboard session; the cookie is valid only while its row is open."""

    __tablename__ = "dashboard_sessions"
    __table_args__ = (Index("ix_dashboard_sessions_expires", "expires_at"),)

    id: str = Field(primary_key=True, max_length=64)  # SHA-256 of the cookie's nonce
    key_id: str = Field(max_length=32)
    created_at: datetime = _ts(nullable=False)
    expires_at: datetime = _ts(nullable=False)
    ended_at: datetime | None = _ts()


class Task(SQLModel, table=True):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("tenant", "name", name="uq_tasks_tenant_name"),
        # The deadline sweep reads only running tasks due now.
        Index("ix_tasks_state_deadline", "state", "deadline"),
        Index("ix_tasks_parent", "parent_id"),
        # The retention purge reads ended tasks by age.
        Index("ix_tasks_ended", "ended_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    tenant: str = Field(max_length=128)
    name: str = Field(max_length=256)
    owner_key_id: str = Field(max_length=32)
    source: str = Field(max_length=512)
    workload: str | None = Field(default=None, max_length=512)
    parent_id: str | None = Field(default=None, max_length=32)
    depth: int = 0
    state: str = Field(max_length=16)
    max_ttl: int | None = None  # smallest max_ttl of its grants' profiles
    # A rotation moves it on: claim tokens carry it, and older ones are refused.
    claim_generation: int = 0
    started_at: datetime | None = _ts()
    deadline: datetime | None = _ts()
    ended_at: datetime | None = _ts()
    created_at: datetime = _ts(nullable=False)


class Credential(SQLModel, table=True):
    __tablename__ = "credentials"
    __table_args__ = (
        UniqueConstraint("task_id", "grant", "generation", name="uq_credentials_grant"),
        # Re-drive and the dashboard read by state; the rest by task.
        Index("ix_credentials_state_updated", "state", "updated_at"),
        Index("ix_credentials_task", "task_id"),
        # The deadline sweep reads what is due again (a lost message) by time.
        Index("ix_credentials_next_attempt", "next_attempt_at"),
        Index("ix_credentials_token_digest", "token_digest", unique=True),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    tenant: str = Field(max_length=128)
    task_id: str = Field(foreign_key="tasks.id", max_length=32)
    grant: str = Field(max_length=64)
    generation: int = 0  # a rotation makes the next generation
    profile: str = Field(max_length=64)
    issuer: str = Field(max_length=16)
    state: str = Field(max_length=20)
    backend_name: str = Field(max_length=63)  # recorded before the mint
    backend_ref: str | None = Field(default=None, max_length=128)
    # A dynamic secret's own lease (vault-dynamic): a heartbeat renews it with the token.
    backend_lease: str | None = Field(default=None, max_length=512)
    # SHA-256 (hex) of a token the holder presents to Leasehold itself (a proxy
    # credential's proxy token); the token is only in the sealed claim answer.
    token_digest: str | None = Field(default=None, max_length=64)
    expires_at: datetime | None = _ts()
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)
    minted_at: datetime | None = _ts()
    claimed_at: datetime | None = _ts()
    revoked_at: datetime | None = _ts()
    revoke_reason: str | None = Field(default=None, max_length=16)
    revoke_requested_at: datetime | None = _ts()
    # Set when an operator approved an `approval = true` grant: such a task's deadline
    # no longer moves without a new approval (app.ledger.approve).
    approved_at: datetime | None = _ts()
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_column=Column(Text))
    sealed_secret: str | None = Field(default=None, sa_column=Column(Text))
    # While pending or revoking: when to enqueue its job again if the row has not
    # moved on by then (the message was lost). None once settled.
    next_attempt_at: datetime | None = _ts()


class KillSwitch(SQLModel, table=True):
    """A kill switch: every credential matching all of its set fields is revoked, and
    no new one is minted, until it is lifted. None in a field matches anything."""

    __tablename__ = "kill_switches"
    __table_args__ = (Index("ix_kill_switches_lifted", "lifted_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    tenant: str | None = Field(default=None, max_length=128)
    profile: str | None = Field(default=None, max_length=64)
    workload: str | None = Field(default=None, max_length=512)
    source: str | None = Field(default=None, max_length=512)
    created_at: datetime = _ts(nullable=False)
    created_by: str = Field(max_length=128)
    # What throwing it did at once (the answer's counts; progress reads the ledger).
    revoking: int = 0
    denied: int = 0
    lifted_at: datetime | None = _ts()
    lifted_by: str | None = Field(default=None, max_length=128)


class MintLease(SQLModel, table=True):
    """Who is minting a pending credential: one delivery at a time.

    A table of its own (no foreign key) so that taking a lease never waits for
    the credential's row lock (an ending task holds it)."""

    __tablename__ = "mint_leases"

    credential_id: str = Field(primary_key=True, max_length=32)
    token: str = Field(max_length=64)  # the Celery task id: its retries keep the lease
    until: datetime = _ts(nullable=False)


class TaskCA(SQLModel, table=True):
    """A task's forward-mode CA (app/proxy/ca.py): its certificate, and its key sealed
    (app/core/sealing.py) until the task ends, when the key is destroyed."""

    __tablename__ = "task_cas"

    task_id: str = Field(foreign_key="tasks.id", primary_key=True, max_length=32)
    cert_pem: str = Field(sa_column=Column(Text, nullable=False))
    sealed_key: str | None = Field(default=None, sa_column=Column(Text))
    hosts: str = Field(sa_column=Column(Text, nullable=False))  # JSON list, for the record
    not_after: datetime = _ts(nullable=False)
    created_at: datetime = _ts(nullable=False)


class Event(SQLModel, table=True):
    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("tenant", "source", "event_id", name="uq_events_key"),
        Index("ix_events_received", "received_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    tenant: str = Field(max_length=128)
    source: str = Field(max_length=512)
    event_id: str = Field(max_length=256)
    type: str = Field(max_length=32)
    subject: str = Field(max_length=256)
    body_hash: str = Field(max_length=64)
    key_id: str = Field(max_length=32)
    time: datetime | None = _ts()
    received_at: datetime = _ts(nullable=False)
    data: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class AuditEntry(SQLModel, table=True):
    __tablename__ = "audit"
    __table_args__ = (
        Index("ix_audit_task", "task_id"),
        Index("ix_audit_credential", "credential_id"),
        # The dashboard's interceptions panel reads entries by action and time.
        Index("ix_audit_action_at", "action", "at"),
        # The audit export: what is not yet written (NULL) and the chain's head.
        Index("ix_audit_exported_seq", "exported_seq", unique=True),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    at: datetime = _ts(nullable=False)
    tenant: str | None = Field(default=None, max_length=128)
    actor: str = Field(max_length=128)  # key name, or "system"
    action: str = Field(max_length=32)
    task_id: str | None = Field(default=None, max_length=32)
    credential_id: str | None = Field(default=None, max_length=32)
    reason: str | None = Field(default=None, max_length=32)
    detail: str | None = Field(default=None, sa_column=Column(Text))
    # Set once by the audit exporter (schedules/audit_export.py): the entry's line in the
    # chain and that line's hash. NULL: not yet exported (retention keeps it).
    exported_seq: int | None = Field(default=None, sa_column=Column(BigInteger))
    export_hash: str | None = Field(default=None, max_length=64)


class SweepCounts(SQLModel):
    """What every reconciliation run counts: the Sweep row, the run's report, the API
    and the CLI all take the names from here (SWEEP_COUNTS)."""

    checked: int = 0
    orphans_revoked: int = 0
    vanished: int = 0
    rerevoked: int = 0
    redriven: int = 0
    errors: int = 0


SWEEP_COUNTS = tuple(SweepCounts.model_fields)


class Sweep(SweepCounts, table=True):
    """One reconciliation run: what it checked, found and did."""

    __tablename__ = "sweeps"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    started_at: datetime = _ts(nullable=False)
    finished_at: datetime | None = _ts()
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
