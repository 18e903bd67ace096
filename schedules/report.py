"""What one reconciliation run found and did: counted, noted, stored and printed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Field

from app.core.logs import log
from app.core.models import SWEEP_COUNTS, SweepCounts
from app.core.redact import clip

DETAIL_LIMIT = 100  # items kept per list in a sweep's detail


class SweepReport(SweepCounts):
    """One run; its counters are SweepCounts' (app/core/models.py), its detail free-form."""

    skipped: bool = False
    id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    detail: dict[str, Any] = Field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in SWEEP_COUNTS}

    def note(self, kind: str, item: Any) -> None:
        items = self.detail.setdefault(kind, [])
        if len(items) < DETAIL_LIMIT:
            items.append(item)
        else:
            self.detail[f"{kind}_truncated"] = True

    def bump(self, kind: str, n: int = 1) -> None:
        self.detail[kind] = self.detail.get(kind, 0) + n

    def error(self, backend: str, action: str, exc: Exception, ref: str | None = None) -> None:
        self.errors += 1
        error = clip(exc)
        self.note("errors", {"backend": backend, "action": action, "ref": ref, "error": error})
        log.warning(
            "reconciliation error", extra={"backend": backend, "action": action, "error": error}
        )


# How `leasehold sweep` labels each count (in SWEEP_COUNTS order, in flight before errors).
_LABELS = {
    "orphans_revoked": "orphans revoked",
    "vanished": "vanished",
    "rerevoked": "revoked again",
    "redriven": "re-driven",
    "errors": "errors",
}


def render_report(report: SweepReport) -> str:
    """What `leasehold sweep` prints."""
    if report.skipped:
        return "skipped: another sweep is running"
    d = report.detail
    lines = [
        f"sweep {report.id}",
        f"{'checked':<17}{report.checked} marked objects in "
        f"{len(d.get('backends', []))} backends, {d.get('active_checked', 0)} active credentials",
    ]
    for name, label in _LABELS.items():
        if name == "errors":
            lines.append(f"{'in flight':<17}{d.get('in_flight', 0)} (being minted: left alone)")
        lines.append(f"{label:<17}{getattr(report, name)}")
    for item in d.get("orphans", []):
        where = f"{item.get('backend', '')} {item.get('name') or item.get('ref') or ''}".strip()
        lines.append(f"  orphan    {where or item.get('credential')}: {item['why']}")
    for item in d.get("vanished", []):
        lines.append(f"  vanished  credential {item['credential']} ({item['profile']})")
    for item in d.get("rerevoked", []):
        lines.append(f"  again     {item['backend']} {item['ref']}")
    for item in d.get("errors", []):
        lines.append(f"  error     {item['backend']} {item['action']}: {item['error']}")
    return "\n".join(lines)
