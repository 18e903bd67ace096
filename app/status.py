"""`leasehold status`: the dashboard's top-line figures and the active credentials."""

from __future__ import annotations

import unicodedata

from sqlmodel import Session

from app.core.models import utcnow
from app.core.settings import get_settings
from app.observability import overview

# Controls, format characters (bidi overrides, zero-width) and separators: nothing an
# emitter writes may move the cursor, recolour or retitle an operator's terminal.
_UNSAFE = {"Cc", "Cf", "Cs", "Co", "Zl", "Zp"}


def printable(text: str, *, keep: str = "") -> str:
    """`text` with every control or format character shown as an escape (\\x1b, \\u202e);
    characters in `keep` (say, a newline in multi-line output) stay."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in keep or unicodedata.category(ch) not in _UNSAFE:
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def render_status(session: Session, *, limit: int = 50, tenant: str | None = None) -> str:
    now = utcnow()
    s = overview.summary(
        session, tenant=tenant, now=now, alert_after=get_settings().revoke_alert_after
    )
    if s.last_sweep is None:
        sweep = "no sweep yet"
    else:
        when = s.last_sweep.finished_at or s.last_sweep.started_at
        sweep = f"{s.last_sweep.orphans_revoked} orphans, {overview.ago(now - when)} ago" + (
            "" if s.last_sweep.finished_at else " (running)"
        )
    lines = [
        f"running tasks        {s.running_tasks}",
        f"active credentials   {s.active_total}"
        + (" (" + ", ".join(f"{i}/{p} {n}" for i, p, n in s.active) + ")" if s.active else ""),
        f"revoked last hour    {s.revoked_last_hour}",
        f"failing revocations  {s.failing}",
        f"last sweep           {sweep}",
        "",
    ]
    rows = overview.live_credentials(session, tenant=tenant, limit=limit, revoking=False)
    if not rows:
        lines.append("no active credentials")
        return "\n".join(lines)
    lines.append(
        f"{'TASK':40} {'GRANT':12} {'PROFILE':20} {'ISSUER':13} {'AGE':>6} {'LEFT':>6}  WORKLOAD"
    )
    for r in rows:
        age = overview.ago(now - r.minted_at) if r.minted_at else "-"
        left = overview.ago(r.deadline - now) if r.deadline else "-"
        task, grant, profile = printable(r.task), printable(r.grant), printable(r.profile)
        lines.append(
            f"{task[:40]:40} {grant[:12]:12} {profile[:20]:20} "
            f"{printable(r.issuer):13} {age:>6} {left:>6}  {printable(r.workload or '-')}"
        )
    return "\n".join(lines)
