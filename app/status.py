"""`leasehold status`: the top-line figures and the active credentials."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, col, func, select

from app.models import Credential, CredState, Task, TaskState, utcnow
from app.settings import get_settings


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return f"-{_age(-delta)}"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def render_status(session: Session, *, limit: int = 50) -> str:
    now = utcnow()
    running = session.exec(
        select(func.count()).select_from(Task).where(Task.state == TaskState.running)
    ).one()
    by_state = dict(
        session.exec(select(Credential.state, func.count()).group_by(Credential.state)).all()
    )
    hour = session.exec(
        select(func.count()).select_from(Credential).where(
            Credential.state == CredState.revoked,
            col(Credential.revoked_at) >= now - timedelta(hours=1),
        )
    ).one()
    failing = session.exec(
        select(func.count()).select_from(Credential).where(
            Credential.state == CredState.revoking,
            Credential.attempts >= get_settings().revoke_alert_after,
        )
    ).one()
    lines = [
        f"running tasks        {running}",
        "credentials          " + (
            ", ".join(f"{s} {n}" for s, n in sorted(by_state.items())) or "none"
        ),
        f"revoked last hour    {hour}",
        f"failing revocations  {failing}",
        "",
    ]
    rows = session.exec(
        select(Credential, Task)
        .join(Task)
        .where(Credential.state == CredState.active)
        .order_by(col(Credential.minted_at).desc())
        .limit(limit)
    ).all()
    if not rows:
        lines.append("no active credentials")
        return "\n".join(lines)
    lines.append(f"{'TASK':40} {'GRANT':12} {'PROFILE':20} {'ISSUER':13} {'AGE':>6} {'LEFT':>6}")
    for cred, task in rows:
        age = _age(now - cred.minted_at) if cred.minted_at else "-"
        left = _age(task.deadline - now) if task.deadline else "-"
        lines.append(
            f"{task.name[:40]:40} {cred.grant[:12]:12} {cred.profile[:20]:20} "
            f"{cred.issuer:13} {age:>6} {left:>6}"
        )
    return "\n".join(lines)
