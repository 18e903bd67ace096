"""The reconciliation's judgement of one marked object: pure, no I/O.

Given what a backend shows (a MarkedObject), the ledger's row for its credential
(or none), and the ref the row recorded (Issuer.ref_for), say what to do. The
run (schedules/reconcile.py) acts on the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from app.core.models import CredState, TaskState
from app.issuers.base import MarkedObject
from app.ledger import HeldRow

# Clock differences between processes (a row's minted_at is written after its object
# exists); also: rows due to expire about now are the deadline sweep's, not "vanished".
MARGIN = timedelta(seconds=2)


class Act(StrEnum):
    revoke_orphan = "revoke_orphan"  # the object goes; nothing holds it
    revoke_again = "revoke_again"  # revoked in the ledger, still in the backend
    queue_revoke = "queue_revoke"  # a live row of an ended task: revoke it the usual way
    orphan_and_queue = "orphan_and_queue"  # both: an unrecorded object of an ended task
    in_flight = "in_flight"  # being minted for a running task: never touched
    revoking = "revoking"  # its revoke is under way (and re-driven if stuck)
    held = "held"  # held for a running task: only its expiry is checked


@dataclass(frozen=True)
class Verdict:
    act: Act
    why: str = ""


def judge(
    obj: MarkedObject,
    row: HeldRow | None,
    row_ref: str | None,
    *,
    now: datetime,
    pending_grace: timedelta,
) -> Verdict:
    """What to do about one marked object; `row_ref` is what `row` recorded as its ref."""
    if row is None:
        return Verdict(Act.revoke_orphan, "no credential in the ledger")
    same = row_ref == obj.ref
    running = row.task_state == TaskState.running
    if row.state == CredState.revoked:
        if same:
            return Verdict(Act.revoke_again)
        return Verdict(Act.revoke_orphan, "another object of a revoked credential")
    if row.state in (CredState.failed, CredState.denied, CredState.awaiting_approval):
        return Verdict(Act.revoke_orphan, f"the credential is {row.state}")
    if not same and row.backend_ref is not None:
        # e.g. a second Vault token from a mint retried after a crash: the row names another.
        return Verdict(Act.revoke_orphan, "not the object the ledger recorded for this credential")
    if row.state == CredState.revoking:
        if not same:
            # A mint that never recorded its object (a Vault token from a killed worker),
            # then the task ended: the credential's revoke has no ref and cannot find it.
            return Verdict(Act.revoke_orphan, "its task has ended")
        return Verdict(Act.revoking)
    # pending or active
    if not running:
        if not same:  # a Vault token the row never recorded: nothing else will find it
            return Verdict(Act.orphan_and_queue, "its task has ended")
        return Verdict(Act.queue_revoke)
    if row.state == CredState.pending:
        if row.updated_at > now - pending_grace:
            return Verdict(Act.in_flight)
        # A mint that never reached the ledger (its worker died): the object goes, and the
        # re-drive mints the credential again.
        return Verdict(Act.revoke_orphan, "minted but never recorded")
    return Verdict(Act.held)


def expiry_lags(obj: MarkedObject, row: HeldRow) -> bool:
    """The backend expires the object before the ledger's deadline: a heartbeat's
    extend never ran (a lost message)."""
    raw = obj.extra.get("valid_until") or obj.extra.get("expire_time")
    if not raw or row.expires_at is None:
        return False
    try:
        backend_expiry = datetime.fromisoformat(raw)
    except ValueError:
        return False
    return backend_expiry.tzinfo is not None and backend_expiry < row.expires_at - MARGIN


def vanished(row: HeldRow, row_ref: str | None, listed: set[str], listed_at: datetime) -> bool:
    """An active row minted before the listing whose object the listing lacks."""
    if row_ref in listed:
        return False
    # Expiring about now: the backend expired it on time; the deadline sweep ends the task.
    return row.expires_at is None or row.expires_at > listed_at + MARGIN
