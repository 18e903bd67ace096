"""One way to run a job: every Leasehold Celery task is declared with `@job(...)`.

    @job(queue.MINT, max_retries=6, retry_on=(TemporaryIssuerError, OperationalError))
    def mint_credential(credential_id: str) -> str: ...

The declaration says what the body's errors mean, checked in this order (as Sentry's
`retry(on=, exclude=, ignore=)`):

- `ignore`: swallowed; the run ends with None (a duplicate, a job with nothing to do).
- `permanent`: raised at once, never retried (checked before `retry_on`, so a subclass
  can be excluded from a retried family).
- `retry_on`: retried up to `max_retries` times after a delay: the `delay` (seconds) the
  error carries if any (e.g. TemporaryIssuerError(delay=...), a revoke's backoff counted
  in the ledger), else capped exponential backoff with jitter. Past `max_retries` the
  error is raised (or `on_give_up` says how the job ends); the ledger's re-drive finds
  the work again, since every row waiting for a job is due again by itself.
- anything else: raised; the run failed.

Each run is timed and counted in `leasehold_job_duration_seconds{job}` and
`leasehold_jobs_total{job,outcome}` (outcome: ok, retry, failed, ignored; never an id).
Messages carry ids only; acks are late (app.queue), so a job must be idempotent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from celery import Task
from sqlalchemy.exc import StatementError

from app.core.logs import log
from app.observability import observe
from app.queue import QUEUES, celery_app
from workers.backoff import backoff

Errors = tuple[type[Exception], ...]
MAX_DELAY = 300.0  # an error's own delay is honoured up to this: every wait has a bound


def retry_delay(exc: BaseException, retries: int) -> float:
    """The error's own `delay` when it carries a usable one, else backoff(retries)."""
    delay = getattr(exc, "delay", None)
    if isinstance(delay, int | float) and not isinstance(delay, bool) and delay >= 0:
        return min(float(delay), MAX_DELAY)
    return backoff(retries)


def error_text(exc: BaseException) -> str:
    """What a log line may say of an error: a database error by its driver's class only
    (its text can quote the statement's parameters), anything else briefly."""
    if isinstance(exc, StatementError):
        return f"{type(exc).__name__} ({type(exc.orig).__name__})"
    return f"{type(exc).__name__}: {exc}"[:300]


def job(
    name: str,
    *,
    max_retries: int = 0,
    retry_on: Errors = (),
    permanent: Errors = (),
    ignore: Errors = (),
    on_give_up: Callable[..., Any] | None = None,
    bind: bool = False,
) -> Callable[[Callable[..., Any]], Task[Any, Any]]:
    """Register `body` as the Celery task `name` (a constant of app.queue, which also
    gives its queue). `on_give_up(exc, *args)`, if given, ends a job out of retries
    with its return value instead of the error. `bind`: the body gets the task first
    (for `self.request`)."""
    if name not in QUEUES:
        raise ValueError(f"job {name!r} has no queue in app.queue.QUEUES")

    def decorate(body: Callable[..., Any]) -> Task[Any, Any]:
        def run(self: Task[Any, Any], *args: Any, **kwargs: Any) -> Any:
            started = time.monotonic()
            outcome = "failed"
            try:
                result = body(self, *args, **kwargs) if bind else body(*args, **kwargs)
                outcome = "ok"
                return result
            except ignore as exc:
                outcome = "ignored"
                log.info("job ignored an error", extra={"job": name, "error": error_text(exc)})
                return None
            except permanent:
                raise
            except retry_on as exc:
                retries = self.request.retries
                if self.max_retries is not None and retries >= self.max_retries:
                    if on_give_up is not None:
                        return on_give_up(exc, *args, **kwargs)
                else:
                    outcome = "retry"
                countdown = retry_delay(exc, retries)
                log.warning(
                    "job failed; retrying" if outcome == "retry" else "job out of retries",
                    extra={
                        "job": name,
                        "ids": list(args),  # messages carry ids only: nothing secret
                        "retries": retries,
                        "countdown": round(countdown, 3),
                        "error": error_text(exc),
                    },
                )
                # Past max_retries, retry() raises `exc` itself (or, called directly, always).
                raise self.retry(countdown=countdown, exc=exc) from None
            finally:
                observe.job_ran(name, outcome, time.monotonic() - started)

        # Named as the body, but without __wrapped__: Celery checks call arguments
        # against `run`'s own signature.
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(run, attr, getattr(body, attr))
        task = celery_app.task(name=name, bind=True, max_retries=max_retries, ignore_result=True)
        return task(run)

    return decorate
