"""Carrying out a kill switch: what it matches, a batch per unit of work, each batch
enqueued to the revoke queue after its commit. The API runs it when a switch is
thrown; the deadline sweep runs it for every switch in force, so what an interrupted
request (or a row that was still being written) left is taken within a sweep."""

from __future__ import annotations

from datetime import timedelta

from app import ledger
from app.core.db import session_scope
from app.core.models import KillSwitch, utcnow
from app.queue import enqueue_revoke

BATCH = 500
THROWER_TIME = timedelta(seconds=20)


def take_matching(switch_id: str, *, actor: str, batch: int = BATCH) -> tuple[int, int]:
    """Revoke (and deny) what a switch in force matches; returns (revoking, denied)."""
    revoking = denied = 0
    while True:
        with session_scope() as session:
            switch = session.get(KillSwitch, switch_id)
            if switch is None or switch.lifted_at is not None:
                break
            done = ledger.revoke_switched(session, switch, actor=actor, now=utcnow(), limit=batch)
        enqueue_revoke(done.to_revoke)
        revoking, denied = revoking + len(done.to_revoke), denied + done.denied
        if not done.more:
            break
    return revoking, denied


def enforce_all(older_than: timedelta = THROWER_TIME) -> tuple[int, int]:
    """take_matching for every switch in force (the sweep's backstop). A switch younger
    than `older_than` is left to the request that threw it, which answers its counts."""
    cutoff = utcnow() - older_than
    with session_scope() as session:
        ids = [s.id for s in ledger.switches_in_force(session) if s.created_at <= cutoff]
    revoking = denied = 0
    for switch_id in ids:
        r, d = take_matching(switch_id, actor="system")
        revoking, denied = revoking + r, denied + d
    return revoking, denied
