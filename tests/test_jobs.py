"""One way to run a job: the names the API, the sweeps and beat address are the jobs the
worker registers, and `workers.job.job` retries, gives up, refuses and ignores as each
job declares, counting every run. No service is needed: jobs run eagerly in-process."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Task
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from app import queue
from app.observability import metrics
from workers.backoff import backoff
from workers.job import MAX_DELAY, job, retry_delay

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


@pytest.fixture(scope="module")
def registered() -> set[str]:
    """The jobs a worker knows: its app after importing the modules it is told to."""
    for module in queue.celery_app.conf.include:
        importlib.import_module(module)
    return set(queue.celery_app.tasks)


def test_every_enqueued_and_scheduled_name_is_a_registered_job(
    registered: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, str]] = []

    def send_task(name: str, args: list[str], queue: str, **shown: str) -> None:  # the edge
        assert args == ["c1"]
        # The reprs a message's headers carry: the id again, nothing more.
        assert shown == {"argsrepr": "['c1']", "kwargsrepr": "{}"}
        sent.append((name, queue))

    monkeypatch.setattr(queue.celery_app, "send_task", send_task)
    for enqueue in (
        queue.enqueue_mint,
        queue.enqueue_extend,
        queue.enqueue_revoke,
        queue.enqueue_approval_request,
    ):
        enqueue(["c1"])
    assert len(sent) == 4
    routes = queue.celery_app.conf.task_routes
    for name, on in sent:
        assert name in registered, name
        assert on == routes[name]["queue"], name

    import schedules.beat

    schedules.beat.install_schedule()
    scheduled = queue.celery_app.conf.beat_schedule.values()
    assert len(scheduled) == 5  # deadlines, reconcile, retention, audit export, vault token
    for entry in scheduled:
        assert entry["task"] in registered, entry["task"]
        assert entry["options"]["queue"] == queue.QUEUES[entry["task"]]
    # And every job has its queue, revocations never behind mints.
    assert set(queue.QUEUES) <= registered
    assert queue.QUEUES[queue.REVOKE] == queue.REVOKE_QUEUE
    assert {queue.QUEUES[name] for name in (queue.SWEEP_DEADLINES, queue.RECONCILE)} == {
        queue.REVOKE_QUEUE
    }


def test_a_job_without_a_queue_is_refused() -> None:
    with pytest.raises(ValueError, match="no queue"):
        job("tests.jobs.unknown")(lambda: None)


class Busy(Exception):
    def __init__(self, delay: float | None = None) -> None:
        super().__init__("busy")
        if delay is not None:
            self.delay = delay


class Refused(Busy):
    """Of the retried family, but declared permanent."""


class Nothing(Exception):
    pass


def test_retry_delay_is_the_errors_own_bounded_or_backoff() -> None:
    assert retry_delay(Busy(delay=7), retries=3) == 7.0
    assert retry_delay(Busy(delay=0), retries=3) == 0.0
    assert retry_delay(Busy(delay=10**9), retries=0) == MAX_DELAY
    for odd in (Busy(), Busy(delay=-1), Busy(delay=True)):
        assert 0.5 <= retry_delay(odd, retries=2) <= 2.0  # backoff(2): 0.5 .. 2
    assert 0.5 <= backoff(30) <= 60.0


NAME = "tests.jobs.flaky"


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Task, list[Any]]]:
    """A job that fails with what `plan` says, in order, then answers "done"."""
    monkeypatch.setitem(queue.QUEUES, NAME, queue.MINT_QUEUE)
    plan: list[Any] = []
    calls: list[str] = []

    def gave_up(exc: BaseException, arg: str) -> str:
        return f"gave up on {arg}: {exc}"

    @job(
        NAME,
        max_retries=2,
        retry_on=(Busy,),
        permanent=(Refused,),
        ignore=(Nothing,),
        on_give_up=gave_up,
    )
    def run(arg: str) -> str:
        calls.append(arg)
        if plan:
            raise plan.pop(0)
        return "done"

    yield run, [plan, calls]
    queue.celery_app.tasks.unregister(NAME)


def runs(outcome: str) -> float:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics.prepare()))
    value = registry.get_sample_value("leasehold_jobs_total", {"job": NAME, "outcome": outcome})
    return value or 0.0


def test_a_job_retries_what_it_declares_and_counts_each_run(
    flaky: tuple[Task, list[Any]],
) -> None:
    task, (plan, calls) = flaky
    before = {o: runs(o) for o in metrics.JOB_OUTCOMES}
    plan.extend([Busy(delay=0), Busy(delay=0)])
    assert task.apply(args=["a"]).get() == "done"
    assert calls == ["a"] * 3
    assert runs("retry") - before["retry"] == 2
    assert runs("ok") - before["ok"] == 1

    # Out of retries: the job ends as it declared (here: an answer, not the error).
    calls.clear()
    plan.extend([Busy(delay=0)] * 3)
    assert task.apply(args=["b"]).get() == "gave up on b: busy"
    assert calls == ["b"] * 3
    assert runs("failed") - before["failed"] == 1


def test_a_permanent_error_is_never_retried_and_an_ignored_one_ends_the_job(
    flaky: tuple[Task, list[Any]],
) -> None:
    task, (plan, calls) = flaky
    before = {o: runs(o) for o in metrics.JOB_OUTCOMES}
    plan.append(Refused(delay=0))
    with pytest.raises(Refused):
        task.apply(args=["p"]).get()
    assert calls == ["p"]
    assert runs("failed") - before["failed"] == 1

    calls.clear()
    plan.append(Nothing())
    assert task.apply(args=["i"]).get() is None
    assert calls == ["i"]
    assert runs("ignored") - before["ignored"] == 1

    calls.clear()
    plan.append(KeyError("undeclared"))  # neither: raised, not retried
    with pytest.raises(KeyError):
        task.apply(args=["u"]).get()
    assert calls == ["u"]
    assert runs("failed") - before["failed"] == 2


def test_out_of_retries_a_job_raises_its_error_for_the_redrive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "tests.jobs.always-busy"
    monkeypatch.setitem(queue.QUEUES, name, queue.REVOKE_QUEUE)
    calls: list[str] = []

    @job(name, max_retries=1, retry_on=(Busy,))
    def run(arg: str) -> None:
        calls.append(arg)
        raise Busy(delay=0)

    try:
        with pytest.raises(Busy):
            run.apply(args=["x"]).get()
        assert calls == ["x", "x"]
    finally:
        queue.celery_app.tasks.unregister(name)


def test_nothing_in_app_imports_the_workers() -> None:
    """The API enqueues through app.queue by name: `app` never imports `workers`."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "app"
    offenders = [
        str(path.relative_to(root.parent))
        for path in root.rglob("*.py")
        for line in path.read_text().splitlines()
        if line.strip().startswith(("from workers", "import workers"))
    ]
    assert offenders == []
