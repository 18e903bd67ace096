"""The retention purge: ended tasks whose credentials hold nothing, and old events, go;
everything else stays."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import select

from app.core.db import session_scope
from app.core.models import AuditEntry, Credential, Event, Task, utcnow
from schedules.retention import purge
from tests.support.api import auth, event, started, states, unique
from tests.support.procs import wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


def _age(name: str, days: int) -> None:
    """Move a task's end and its events back in time."""
    then = utcnow() - timedelta(days=days)
    with session_scope() as s:
        task = s.exec(select(Task).where(Task.name == name)).one()
        task.ended_at = then
        for ev in s.exec(select(Event).where(Event.subject == name)):
            ev.received_at = then


def _exists(name: str) -> tuple[bool, int, int]:
    with session_scope() as s:
        task = s.exec(select(Task).where(Task.name == name)).first()
        creds = (
            len(list(s.exec(select(Credential).where(Credential.task_id == task.id))))
            if (task)
            else 0
        )
        events = len(list(s.exec(select(Event).where(Event.subject == name))))
        return task is not None, creds, events


def test_purge_keeps_what_is_young_or_unsettled(app_client: Any, keys: dict[str, str]) -> None:
    old, young, stuck = unique("old"), unique("young"), unique("stuck")
    for name in (old, young, stuck):
        app_client.post(
            "/v1/events", json=started(name, {"kv": "kv-reader"}), headers=auth(keys["emitter"])
        )
        wait_until(lambda n=name: states("t1", n) == {"kv": "active"})
    for name in (old, young):
        app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))
        wait_until(lambda n=name: states("t1", n) == {"kv": "revoked"})
    # An ended task whose revoke has not been confirmed must stay, however old.
    app_client.post("/v1/events", json=event("failed", stuck), headers=auth(keys["emitter"]))
    wait_until(lambda: states("t1", stuck) == {"kv": "revoked"})
    with session_scope() as s:
        cred = s.exec(select(Credential).join(Task).where(Task.name == stuck)).one()
        cred.state = "revoking"
    _age(old, 31)
    _age(stuck, 31)
    _age(young, 29)

    tasks, creds, events = purge()
    assert tasks >= 1 and creds >= 1 and events >= 2
    assert _exists(old) == (False, 0, 0)
    assert _exists(young)[0] and _exists(young)[1] == 1 and _exists(young)[2] == 2
    assert _exists(stuck)[:2] == (True, 1)
    with session_scope() as s:  # the audit trail is kept
        assert list(s.exec(select(AuditEntry).where(AuditEntry.action == "task_started")))
        cred = s.exec(select(Credential).join(Task).where(Task.name == stuck)).one()
        cred.state = "revoked"
