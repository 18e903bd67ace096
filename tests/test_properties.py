"""Property: whatever the order, duplication and loss of events and worker messages,
after quiet and one sweep every credential of an ended task is revoked (and gone
from its backend), a task whose terminal event came first has nothing minted,
no grant has two credentials, and every running task's credentials are active.

Events go through app.ledger.apply_event as the API applies them; the mint and
revoke workers run as functions, fed by a simulated broker that delivers out of
order, twice, never, or kills the worker between mint and record.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from sqlmodel import func, select

from app.core.db import session_scope
from app.core.models import Credential, CredState, Task, TaskState
from app.ledger import LedgerError
from tests.support.isolated import Driver, credential, issuer, mint_request, private_ledger

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

GRANTS = {"kv": "kv-reader", "db": "reports-readonly"}
TERMINAL = ("task.succeeded", "task.failed", "task.cancelled")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[str, Driver]]:
    with private_ledger("prop") as inst:
        yield inst, Driver()


task_index = st.integers(0, 2)
slot = st.integers(0, 63)
start = st.tuples(st.just("start"), task_index, st.booleans())  # bool: the same event again
end = st.tuples(st.just("end"), task_index, st.sampled_from(TERMINAL))
deliver = st.tuples(st.just("deliver"), slot, st.booleans())  # bool: and keep it (a duplicate)
crash = st.tuples(st.just("crash"), slot, st.just(None))  # minted, never recorded
steps = st.lists(
    st.one_of(
        start,
        start,
        end,
        end,
        deliver,
        deliver,
        deliver,
        crash,
        crash,
        st.tuples(st.just("heartbeat"), task_index, st.integers(60, 900)),
        st.tuples(st.just("lose"), slot, st.just(None)),
    ),
    min_size=4,
    max_size=30,
)


class World:
    """One example: three tasks, a broker, the order in which things happen."""

    def __init__(self, inst: str, driver: Driver) -> None:
        self.inst, self.driver = inst, driver
        run = uuid.uuid4().hex[:8]
        self.names = [f"prop/{run}/{i}" for i in range(3)]
        self.queue: list[tuple[str, str]] = []
        self.first: dict[int, str] = {}  # what the ledger applied first for each task
        self.sent: dict[tuple[int, str], str] = {}  # event ids, for duplicates

    def enqueue(self, kind: str) -> Any:
        return lambda ids: self.queue.extend((kind, i) for i in ids)

    def apply(self, t: int, type_: str, data: dict[str, Any] | None, again: bool) -> None:
        event_id = self.sent.get((t, type_)) if again else None
        event_id = event_id or f"{type_}-{uuid.uuid4().hex[:8]}"
        self.sent[(t, type_)] = event_id
        try:
            result = self.driver.apply(type_, self.names[t], data, event_id)
        except LedgerError:  # a heartbeat for a task not started yet: 404
            return
        if not result.duplicate:
            self.first.setdefault(t, type_)
        self.queue.extend(("mint", i) for i in result.to_mint)
        self.queue.extend(("revoke", i) for i in result.to_revoke)

    def run(self, message: tuple[str, str]) -> None:
        from workers.mint import mint
        from workers.revoke import revoke

        kind, cred_id = message
        if kind == "mint":
            mint(cred_id)
        else:
            revoke(cred_id)

    def crash(self, message: tuple[str, str]) -> None:
        """A worker that minted in the backend and was killed before recording it."""
        kind, cred_id = message
        row = credential(cred_id)
        if kind == "mint" and row.state == CredState.pending:
            issuer(row.profile, self.inst).mint(mint_request(row.id, row.backend_name, self.inst))

    def step(self, op: str, a: int, b: Any) -> None:
        if op == "start":
            grants = {"kv": GRANTS["kv"]} if a % 2 else GRANTS
            data = {
                "max_duration": 900,
                "grants": [{"name": n, "profile": p} for n, p in grants.items()],
            }
            self.apply(a, "task.started", data, again=b)
        elif op == "end":
            self.apply(a, b, None, again=False)
        elif op == "heartbeat":
            self.apply(a, "task.heartbeat", {"max_duration": b}, again=False)
        elif self.queue:
            message = self.queue[a % len(self.queue)]
            if not (op == "deliver" and b):
                self.queue.remove(message)
            if op == "deliver":
                self.run(message)
            elif op == "crash":
                self.crash(message)

    def drain(self) -> None:
        while self.queue:
            self.run(self.queue.pop(0))


def rows_of(name: str, tenant: str = "t1") -> tuple[Task | None, list[Credential]]:
    with session_scope() as session:
        task = session.exec(select(Task).where(Task.tenant == tenant, Task.name == name)).first()
        if task is None:
            return None, []
        return task, list(session.exec(select(Credential).where(Credential.task_id == task.id)))


def exists(cred: Credential, inst: str) -> bool:
    ref = cred.backend_ref or (cred.backend_name if cred.issuer == "postgres" else None)
    return ref is not None and issuer(cred.profile, inst).exists(ref)


# CI must give the same answer on every fresh clone: the examples come from a fixed
# derivation of the test's name (derandomize), none are read from a database, and in CI
# a failure is reported as found instead of shrinking for minutes.
PHASES = (Phase.explicit, Phase.generate) if os.environ.get("CI") else tuple(Phase)

# Found in CI: the kv mint crashed after minting (the token exists, the row never
# recorded it), the task ended, and the revoke message was lost. The revoking row has
# no ref, so its revoke cannot find the token: the sweep must revoke it as an orphan.
CRASHED_MINT_THEN_END = [
    ("start", 0, False),
    ("crash", 0, None),
    ("crash", 0, None),
    ("end", 0, "task.succeeded"),
    ("crash", 0, None),
]


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@example(plan=CRASHED_MINT_THEN_END)
@given(plan=steps)
def test_any_order_converges_after_one_sweep(
    world: tuple[str, Driver], plan: list[tuple[str, int, Any]]
) -> None:
    from schedules.reconcile import reconcile

    inst, driver = world
    w = World(inst, driver)
    with ExitStack() as stack:
        for target, kind in (
            ("workers.mint.enqueue_revoke", "revoke"),
            ("schedules.sweep.enqueue_mint", "mint"),
            ("schedules.sweep.enqueue_revoke", "revoke"),
            ("schedules.reconcile.enqueue_revoke", "revoke"),
        ):
            stack.enter_context(mock.patch(target, w.enqueue(kind)))
        stack.enter_context(mock.patch("schedules.reconcile.enqueue_extend"))
        for op, a, b in plan:
            w.step(op, a, b)
        w.drain()  # quiet: whatever the broker still holds is delivered
        # One sweep, as if long after: nothing is in flight, so nothing pending is young.
        report = reconcile(
            trigger="property", pending_grace=timedelta(0), redrive_after=timedelta(0)
        )
        assert not report.skipped and report.errors == 0, report.detail
        assert report.vanished == 0, report.detail
        w.drain()  # the re-driven work

    for t, name in enumerate(w.names):
        task, creds = rows_of(name)
        if task is None:
            continue
        grants = [c.grant for c in creds]
        assert len(grants) == len(set(grants)), f"a grant has two credentials: {creds}"
        if w.first.get(t) in TERMINAL:
            assert creds == [], "a task whose terminal event came first has credentials"
        if task.state == TaskState.running:
            for cred in creds:
                assert cred.state == CredState.active, (name, cred.grant, cred.state)
                assert exists(cred, inst), (name, cred.grant)
        else:
            for cred in creds:
                assert cred.state == CredState.revoked, (name, cred.grant, cred.state)
                assert not exists(cred, inst), (name, cred.grant)
    # Nothing carrying the mark is left that the ledger does not hold for a running task.
    for profile in set(GRANTS.values()):
        for obj in issuer(profile, inst).list_marked():
            with session_scope() as session:
                held = session.exec(
                    select(func.count())
                    .select_from(Credential)
                    .join(Task)
                    .where(
                        Credential.id == obj.credential_id,
                        Credential.backend_ref == obj.ref,
                        Credential.state == CredState.active,
                        Task.state == TaskState.running,
                    )
                ).one()
            assert held == 1, f"left in {profile}: {obj}"
    # Running tasks end, so examples do not pile up.
    for name in w.names:
        task, _ = rows_of(name)
        if task is not None and task.state == TaskState.running:
            for cred_id in driver.end(name):
                w.run(("revoke", cred_id))
