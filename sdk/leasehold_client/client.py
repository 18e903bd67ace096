"""The synchronous client and its `task(...)` context manager."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType
from typing import Any

import httpx

from ._base import (
    MAX_CLAIM_WAIT,
    NOT_SENT,
    Config,
    LeaseholdError,
    TaskAnswer,
    raise_for,
    retry_worth,
    segment,
    started_data,
    task_answer,
)

log = logging.getLogger("leasehold_client")

CLAIM_RETRY = frozenset({429, 500, 503})
ROTATE_RETRY = frozenset({429, 503})


class Client:
    """Sends a task's events to Leasehold and claims its credentials.

    `url` and `key` default to LEASEHOLD_URL and LEASEHOLD_KEY (an emitter key);
    `source` is the CloudEvents source of every event sent. Requests that fail to
    connect, or answer 429 or 5xx, are retried `retries` times with backoff
    (honouring Retry-After, waiting at most `max_retry_wait` seconds at a time);
    other 4xx raise LeaseholdError. Safe to share between threads."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        source: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        max_retry_wait: float = 10.0,
    ) -> None:
        self._config = Config(url, key, source, retries, max_retry_wait)
        self._timeout = timeout
        self._http = httpx.Client(base_url=self._config.url, timeout=timeout)

    def __repr__(self) -> str:  # never the key
        return f"Client(url={self._config.url!r}, source={self._config.source!r})"

    @property
    def url(self) -> str:
        return self._config.url

    @property
    def source(self) -> str:
        return self._config.source

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ---------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        retry_errors: tuple[type[Exception], ...] = (httpx.TransportError,),
        retry_statuses: Iterable[int] | None = None,
    ) -> httpx.Response:
        statuses = frozenset(retry_statuses) if retry_statuses is not None else None
        attempt = 0
        while True:
            answer: httpx.Response | None = None
            try:
                answer = self._http.request(
                    method,
                    path,
                    headers=headers,
                    json=json,
                    params=params,
                    timeout=timeout or self._timeout,
                )
            except retry_errors:
                if attempt >= self._config.retries:
                    raise
            else:
                worth = answer.status_code in statuses if statuses else retry_worth(answer)
                if not worth or attempt >= self._config.retries:
                    return answer
            wait = self._config.backoff(attempt, answer)
            log.info("leasehold: retrying %s %s in %.1fs", method, path.split("?")[0], wait)
            time.sleep(wait)
            attempt += 1

    # --- events ------------------------------------------------------------------

    def emit(
        self,
        type_: str,
        task: str,
        data: dict[str, Any] | None = None,
        *,
        event_id: str | None = None,
    ) -> TaskAnswer:
        """Send one event (`task.started`, ...). Its id is derived from source, task,
        type and a per-type sequence unless `event_id` is given; retries resend the
        same event, so the server counts it once."""
        kind = type_ if type_.startswith("task.") else f"task.{type_}"
        event = self._config.event(kind, task, data, event_id)
        answer = self._request("POST", "/v1/events", headers=self._config.auth(), json=event)
        return task_answer(task, raise_for(answer))

    def started(
        self,
        task: str,
        *,
        grants: dict[str, str],
        max_duration: int,
        workload: str | None = None,
        parent: str | None = None,
    ) -> TaskAnswer:
        """`task.started`: `grants` maps grant names to profiles. The answer carries the
        `claim_token` (the same one again for a task already started) and `deadline`."""
        return self.emit("task.started", task, started_data(grants, max_duration, workload, parent))

    def heartbeat(self, task: str, *, max_duration: int | None = None) -> TaskAnswer:
        """`task.heartbeat`; a `max_duration` (seconds from the task's start) moves the
        deadline forward. The answer carries the `deadline`."""
        data = {"max_duration": int(max_duration)} if max_duration is not None else {}
        return self.emit("task.heartbeat", task, data)

    def succeeded(self, task: str) -> TaskAnswer:
        """`task.succeeded`: the task's credentials are revoked."""
        return self.emit("task.succeeded", task, {})

    def failed(self, task: str) -> TaskAnswer:
        """`task.failed`: the task's credentials are revoked."""
        return self.emit("task.failed", task, {})

    def cancelled(self, task: str) -> TaskAnswer:
        """`task.cancelled`: the task's credentials are revoked."""
        return self.emit("task.cancelled", task, {})

    # --- credentials -------------------------------------------------------------

    def claim(self, task: str, grant: str, claim_token: str, *, wait: float = 10) -> dict[str, Any]:
        """Claim a credential once: the whole answer (`grant`, `profile`, `issuer`,
        `expires_at`, `secret`). While it is being minted the server holds the request
        up to `wait` seconds (at most 30), then answers 409 (LeaseholdError)."""
        wait = max(0.0, min(float(wait), MAX_CLAIM_WAIT))
        answer = self._request(
            "POST",
            f"/v1/tasks/{segment(task)}/credentials/{segment(grant)}/claim",
            headers={"Authorization": f"Bearer {claim_token}"},
            params={"wait": wait} if wait else None,
            timeout=self._timeout + wait,
            retry_errors=NOT_SENT,
            retry_statuses=CLAIM_RETRY,
        )
        return raise_for(answer)

    def rotate(self, task: str, grant: str) -> str:
        """Revoke the credential (reason `rotated`), have a fresh one minted, and
        return the task's new claim token (the old one is refused from then on).
        Recovers a lost claim answer or answers a suspected interception."""
        answer = self._request(
            "POST",
            f"/v1/tasks/{segment(task)}/credentials/{segment(grant)}/rotate",
            headers=self._config.auth(),
            retry_errors=NOT_SENT,
            retry_statuses=ROTATE_RETRY,
        )
        token = raise_for(answer).get("claim_token")
        if not isinstance(token, str):
            raise LeaseholdError(answer.status_code, "the rotation answered no claim_token")
        return token

    def claim_secret(
        self, task: str, grant: str, claim_token: str, *, timeout: float = 60
    ) -> dict[str, Any]:
        """Claim, waiting for the mint up to `timeout` seconds; the `secret`."""
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            try:
                answer = self.claim(task, grant, claim_token, wait=max(0.0, remaining))
            except LeaseholdError as exc:
                if exc.status == 409 and end - time.monotonic() > 0.5:
                    time.sleep(0.5)  # the long poll ended early (e.g. a busy server)
                    continue
                raise
            secret = answer.get("secret")
            if not isinstance(secret, dict):
                raise LeaseholdError(200, "the claim answered no secret")
            return secret

    # --- the context manager -------------------------------------------------------

    def task(
        self,
        task: str,
        *,
        grants: dict[str, str],
        max_duration: int,
        workload: str | None = None,
        parent: str | None = None,
        heartbeat_every: float | None = None,
        claim_timeout: float = 60,
    ) -> TaskRun:
        """A block that is one task: `task.started` on entry; on exit `task.succeeded`,
        `task.failed` (an exception, re-raised) or `task.cancelled` (KeyboardInterrupt).
        `t.credential(grant)` claims once and returns the secret. With
        `heartbeat_every`, a background thread sends a heartbeat every so many
        seconds that keeps the deadline `max_duration` seconds ahead (as far as the
        profiles' max_ttl allows)."""
        return TaskRun(
            self,
            task,
            grants=grants,
            max_duration=max_duration,
            workload=workload,
            parent=parent,
            heartbeat_every=heartbeat_every,
            claim_timeout=claim_timeout,
        )


def ending(exc_type: type[BaseException] | None) -> str:
    """The event that ends a block left with `exc_type`."""
    if exc_type is None:
        return "task.succeeded"
    if issubclass(exc_type, KeyboardInterrupt | asyncio.CancelledError):
        return "task.cancelled"
    return "task.failed"


def extension(started_at: float, max_duration: int) -> int:
    """The max_duration (counted from the start) that puts the deadline max_duration ahead."""
    return math.ceil(time.monotonic() - started_at) + max_duration


class TaskRun:
    """`with client.task(...) as t`: the running task. `t.id`, `t.deadline`,
    `t.credential(grant)`."""

    def __init__(
        self,
        client: Client,
        task: str,
        *,
        grants: dict[str, str],
        max_duration: int,
        workload: str | None,
        parent: str | None,
        heartbeat_every: float | None,
        claim_timeout: float,
    ) -> None:
        self.id = task
        self._client = client
        self._grants = dict(grants)
        self._max_duration = int(max_duration)
        self._workload, self._parent = workload, parent
        self._heartbeat_every = heartbeat_every
        self._claim_timeout = claim_timeout
        self._token: str | None = None
        self._secrets: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._t0 = 0.0
        self.deadline: datetime | None = None
        self.answer: TaskAnswer | None = None

    def __repr__(self) -> str:
        return f"TaskRun(id={self.id!r}, deadline={self.deadline!r})"

    def __enter__(self) -> TaskRun:
        self._t0 = time.monotonic()
        self.answer = self._client.started(
            self.id,
            grants=self._grants,
            max_duration=self._max_duration,
            workload=self._workload,
            parent=self._parent,
        )
        self._token, self.deadline = self.answer.claim_token, self.answer.deadline
        if self._heartbeat_every:
            self._beat = threading.Thread(
                target=self._heartbeats, name=f"leasehold-heartbeat {self.id}", daemon=True
            )
            self._beat.start()
        return self

    def credential(self, grant: str) -> dict[str, Any]:
        """The grant's secret: claimed once (waiting for the mint), then kept here
        until the block ends."""
        with self._lock:
            if grant not in self._secrets:
                if grant not in self._grants:
                    raise KeyError(f"the task has no grant {grant!r}")
                if self._token is None:
                    raise LeaseholdError(410, "the task has ended; nothing to claim")
                self._secrets[grant] = self._client.claim_secret(
                    self.id, grant, self._token, timeout=self._claim_timeout
                )
            return self._secrets[grant]

    def _heartbeats(self) -> None:
        assert self._heartbeat_every is not None
        while not self._stop.wait(self._heartbeat_every):
            try:
                answer = self._client.heartbeat(
                    self.id, max_duration=extension(self._t0, self._max_duration)
                )
                self.deadline = answer.deadline or self.deadline
            except LeaseholdError as exc:
                # 422: past the profiles' max_ttl; 404/403: not ours to extend. The
                # deadline stands; further heartbeats would be refused alike.
                log.warning("leasehold: heartbeat for %r refused (%s); stopping", self.id, exc)
                return
            except httpx.HTTPError as exc:
                log.warning("leasehold: heartbeat for %r failed: %s", self.id, type(exc).__name__)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(self._client._timeout + 1)
        self._secrets.clear()
        kind = ending(exc_type)
        try:
            self._client.emit(kind, self.id, {})
        except Exception:
            if exc_type is None:
                raise
            # Never hide the block's own exception; the deadline still ends the task.
            log.exception("leasehold: could not send %s for %r", kind, self.id)
