"""What the dashboard and `leasehold status` show, read from the ledger.

Every query is tenant-scoped (None: all tenants, for an admin) and rides an
index: credentials by (state, updated_at), tasks by (state, deadline), sweeps
and audit entries by their time-ordered primary key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import Float, and_, cast, extract, literal_column, or_
from sqlmodel import Session, col, func, select

from app.core.models import (
    SWEEP_COUNTS,
    AuditEntry,
    Credential,
    CredState,
    Sweep,
    Task,
    TaskState,
)


class SweepInfo(BaseModel):
    """One sweep as the dashboard and GET /v1/sweeps (SweepOut) show it; the counts
    are SweepCounts' (SWEEP_COUNTS), each required in an answer."""

    model_config = ConfigDict(frozen=True)

    id: str
    started_at: datetime
    finished_at: datetime | None
    checked: int
    orphans_revoked: int
    vanished: int
    rerevoked: int
    redriven: int
    errors: int


@dataclass
class Summary:
    running_tasks: int
    active: list[tuple[str, str, int]]  # (issuer, profile, count)
    revoked_last_hour: int
    failing: int
    last_sweep: SweepInfo | None

    @property
    def active_total(self) -> int:
        return sum(n for _, _, n in self.active)


@dataclass
class CredRow:
    id: str
    tenant: str
    task: str
    grant: str
    profile: str
    issuer: str
    workload: str | None
    state: str
    minted_at: datetime | None
    claimed_at: datetime | None
    deadline: datetime | None
    revoke_reason: str | None
    revoke_requested_at: datetime | None
    revoked_at: datetime | None
    attempts: int
    last_error: str | None
    source: str = ""
    started_at: datetime | None = None
    created_at: datetime | None = None

    @property
    def requested(self) -> float | None:
        """The task's duration as it stands (max_duration, counted from its start)."""
        if self.deadline is None or self.started_at is None:
            return None
        return (self.deadline - self.started_at).total_seconds()

    @property
    def exposure(self) -> float | None:
        """Seconds from the task's end (or the revoke request) to the verified revoke."""
        if self.revoked_at is None or self.revoke_requested_at is None:
            return None
        return (self.revoked_at - self.revoke_requested_at).total_seconds()


@dataclass
class Interception:
    at: datetime
    actor: str
    task: str
    grant: str
    profile: str
    issuer: str


@dataclass
class Bucket:
    start: datetime
    count: int = 0
    p50: float | None = None
    p99: float | None = None


@dataclass
class Series:
    start: datetime
    width: timedelta
    buckets: list[Bucket] = field(default_factory=list)


def failing_clause(alert_after: int) -> Any:
    """Failing revocations: still retrying after `alert_after` attempts, or given up for
    good (`failed` after a revoke was requested; a failed mint has no revoke request).
    Both ride the (state, updated_at) index."""
    return or_(
        and_(col(Credential.state) == CredState.revoking, col(Credential.attempts) >= alert_after),
        and_(
            col(Credential.state) == CredState.failed,
            col(Credential.revoke_requested_at).is_not(None),
        ),
    )


def _scoped(query: Any, column: Any, tenant: str | None) -> Any:
    return query if tenant is None else query.where(column == tenant)


def _sweep_info(row: Sweep) -> SweepInfo:
    return SweepInfo(
        id=row.id,
        started_at=row.started_at,
        finished_at=row.finished_at,
        **{name: getattr(row, name) for name in SWEEP_COUNTS},
    )


def summary(session: Session, *, tenant: str | None, now: datetime, alert_after: int) -> Summary:
    running = session.exec(
        _scoped(
            select(func.count()).select_from(Task).where(Task.state == TaskState.running),
            Task.tenant,
            tenant,
        )
    ).one()
    active = session.exec(
        _scoped(
            select(Credential.issuer, Credential.profile, func.count()).where(
                Credential.state == CredState.active
            ),
            Credential.tenant,
            tenant,
        )
        .group_by(Credential.issuer, Credential.profile)
        .order_by(Credential.issuer, Credential.profile)
    ).all()
    hour_ago = now - timedelta(hours=1)
    # updated_at >= revoked_at on a revoked row, so this bound only narrows the index range.
    revoked = session.exec(
        _scoped(
            select(func.count())
            .select_from(Credential)
            .where(
                Credential.state == CredState.revoked,
                col(Credential.updated_at) >= hour_ago,
                col(Credential.revoked_at) >= hour_ago,
            ),
            Credential.tenant,
            tenant,
        )
    ).one()
    failing = session.exec(
        _scoped(
            select(func.count()).select_from(Credential).where(failing_clause(alert_after)),
            Credential.tenant,
            tenant,
        )
    ).one()
    last = session.exec(select(Sweep).order_by(col(Sweep.id).desc()).limit(1)).first()
    return Summary(
        running_tasks=running,
        active=[(i, p, n) for i, p, n in active],
        revoked_last_hour=revoked,
        failing=failing,
        last_sweep=_sweep_info(last) if last else None,
    )


def _rows(session: Session, query: Any) -> list[CredRow]:
    return [
        CredRow(
            id=c.id,
            tenant=c.tenant,
            task=t.name,
            grant=c.grant,
            profile=c.profile,
            issuer=c.issuer,
            workload=t.workload,
            state=c.state,
            minted_at=c.minted_at,
            claimed_at=c.claimed_at,
            deadline=t.deadline,
            revoke_reason=c.revoke_reason,
            revoke_requested_at=c.revoke_requested_at,
            revoked_at=c.revoked_at,
            attempts=c.attempts,
            last_error=c.last_error,
            source=t.source,
            started_at=t.started_at,
            created_at=c.created_at,
        )
        for c, t in session.exec(query).all()
    ]


def _by_state(state: CredState, tenant: str | None, limit: int) -> Any:
    return (
        _scoped(
            select(Credential, Task)
            .join(Task, col(Task.id) == Credential.task_id)
            .where(Credential.state == state),
            Credential.tenant,
            tenant,
        )
        .order_by(col(Credential.updated_at).desc())
        .limit(limit)
    )


def live_credentials(
    session: Session, *, tenant: str | None, limit: int = 100, revoking: bool = True
) -> list[CredRow]:
    """Active credentials, and (first) those being revoked right now."""
    rows = _rows(session, _by_state(CredState.revoking, tenant, limit)) if revoking else []
    rows += _rows(session, _by_state(CredState.active, tenant, limit))
    return rows[:limit]


@dataclass(frozen=True)
class ProxyCounts:
    """What `leasehold proxy` audited for one credential."""

    forwarded: int = 0
    refused: int = 0
    echoes: int = 0


_PROXY_ACTIONS = {"proxy_request": "forwarded", "proxy_refused": "refused", "proxy_echo": "echoes"}


def proxy_counts(session: Session, credential_ids: list[str]) -> dict[str, ProxyCounts]:
    """Requests per proxy credential, from the audit trail (indexed by credential)."""
    if not credential_ids:
        return {}
    rows = session.exec(
        select(AuditEntry.credential_id, AuditEntry.action, func.count())
        .where(
            col(AuditEntry.credential_id).in_(credential_ids),
            col(AuditEntry.action).in_(list(_PROXY_ACTIONS)),
        )
        .group_by(AuditEntry.credential_id, AuditEntry.action)
    ).all()
    found: dict[str, dict[str, int]] = {}
    for cred_id, action, n in rows:
        found.setdefault(cred_id or "", {})[_PROXY_ACTIONS[action]] = n
    return {cred_id: ProxyCounts(**counts) for cred_id, counts in found.items()}


def awaiting_approval(session: Session, *, tenant: str | None, limit: int = 50) -> list[CredRow]:
    """Grants waiting for an operator's decision, longest waiting last."""
    return _rows(session, _by_state(CredState.awaiting_approval, tenant, limit))


def recent_revocations(session: Session, *, tenant: str | None, limit: int = 20) -> list[CredRow]:
    return _rows(session, _by_state(CredState.revoked, tenant, limit))


def failing_revocations(
    session: Session, *, tenant: str | None, alert_after: int, limit: int = 20
) -> list[CredRow]:
    query = (
        _scoped(
            select(Credential, Task)
            .join(Task, col(Task.id) == Credential.task_id)
            .where(failing_clause(alert_after)),
            Credential.tenant,
            tenant,
        )
        .order_by(col(Credential.updated_at).desc())
        .limit(limit)
    )
    return _rows(session, query)


def interceptions(session: Session, *, tenant: str | None, limit: int = 10) -> list[Interception]:
    """Second claims, newest first (audit action "second_claim")."""
    entries = session.exec(
        _scoped(
            select(AuditEntry).where(AuditEntry.action == "second_claim"), AuditEntry.tenant, tenant
        )
        .order_by(col(AuditEntry.id).desc())
        .limit(limit)
    ).all()
    creds = {
        c.id: (c, t)
        for c, t in session.exec(
            select(Credential, Task)
            .join(Task, col(Task.id) == Credential.task_id)
            .where(col(Credential.id).in_({e.credential_id for e in entries if e.credential_id}))
        ).all()
    }
    out = []
    for e in entries:
        found = creds.get(e.credential_id or "")
        if found is None:
            continue
        c, t = found
        out.append(
            Interception(
                at=e.at,
                actor=e.actor,
                task=t.name,
                grant=c.grant,
                profile=c.profile,
                issuer=c.issuer,
            )
        )
    return out


def sweeps(session: Session, *, limit: int = 10) -> list[SweepInfo]:
    rows = session.exec(select(Sweep).order_by(col(Sweep.id).desc()).limit(limit)).all()
    return [_sweep_info(r) for r in rows]


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation, as PostgreSQL's percentile_cont."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def revocation_series(
    session: Session,
    *,
    tenant: str | None,
    now: datetime,
    span: timedelta = timedelta(hours=1),
    buckets: int = 30,
) -> Series:
    """Revocations per bucket, with p50/p99 of the time to revoke, over the last `span`."""
    width = span / buckets
    width_s = width.total_seconds()
    epoch0 = math.floor((now - span).timestamp() / width_s + 1) * width_s  # aligned buckets
    start = datetime.fromtimestamp(epoch0, tz=now.tzinfo)
    series = Series(
        start=start, width=width, buckets=[Bucket(start=start + width * i) for i in range(buckets)]
    )
    where = [
        col(Credential.state) == CredState.revoked,
        col(Credential.updated_at) >= start,
        col(Credential.revoked_at) >= start,
        col(Credential.revoke_requested_at).is_not(None),
    ]
    if session.get_bind().dialect.name == "postgresql":
        # The database does the arithmetic: 30 rows come back, not every revocation.
        revoked_s = extract("epoch", col(Credential.revoked_at))
        index = func.floor((revoked_s - epoch0) / width_s).label("b")
        exposure = cast(
            extract("epoch", col(Credential.revoked_at) - col(Credential.revoke_requested_at)),
            Float,
        )
        query = _scoped(
            select(
                index,
                func.count(),
                func.percentile_cont(0.5).within_group(exposure),
                func.percentile_cont(0.99).within_group(exposure),
            ).where(*where),
            Credential.tenant,
            tenant,
        ).group_by(literal_column("b"))  # by alias: a repeated expression would bind anew
        for b, count, p50, p99 in session.exec(query).all():
            if 0 <= int(b) < buckets:
                series.buckets[int(b)] = Bucket(
                    start=series.buckets[int(b)].start,
                    count=count,
                    p50=float(p50) if p50 is not None else None,
                    p99=float(p99) if p99 is not None else None,
                )
        return series
    # Embedded SQLite: a small installation; compute here, capped.
    rows = session.exec(
        _scoped(
            select(Credential.revoked_at, Credential.revoke_requested_at).where(*where),
            Credential.tenant,
            tenant,
        ).limit(50_000)
    ).all()
    values: list[list[float]] = [[] for _ in range(buckets)]
    for revoked_at, requested_at in rows:
        b = int((revoked_at.timestamp() - epoch0) // width_s)
        if 0 <= b < buckets:
            values[b].append((revoked_at - requested_at).total_seconds())
    for bucket, vals in zip(series.buckets, values, strict=True):
        if vals:
            vals.sort()
            bucket.count = len(vals)
            bucket.p50, bucket.p99 = _percentile(vals, 0.5), _percentile(vals, 0.99)
    return series


# --- formatting --------------------------------------------------------------


def ago(delta: timedelta | float | None) -> str:
    """A compact duration: 42s, 17m, 5h, 3d (negative: -42s)."""
    if delta is None:
        return "-"
    seconds = int(delta.total_seconds() if isinstance(delta, timedelta) else delta)
    if seconds < 0:
        return f"-{ago(-seconds)}"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def duration(seconds: float | None) -> str:
    """A latency: 7 ms, 1.3 s, 42 s, 5m."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return ago(seconds)
