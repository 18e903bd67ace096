"""The synchronous client and its `task(...)` context manager."""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import httpx

from ._base import (
    ClientCore,
    LeaseholdError,
    Request,
    RunCore,
    TaskAnswer,
    claim_again,
    claim_wait,
    claimed_secret,
    ending,
    heartbeat_data,
    log,
    raise_for,
    rotated_token,
    started_data,
    task_answer,
)


class Client(ClientCore):
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
        super().__init__(url, key, source, timeout, retries, max_retry_wait)
        self._http = httpx.Client(base_url=self._config.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ---------------------------------------------------------------

    def _send(self, request: Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                answer = self._http.request(**request.send_args(self._timeout))
            except request.retry_errors:
                wait = self._retry_wait(request, attempt, None)
                if wait is None:
                    raise
            else:
                wait = self._retry_wait(request, attempt, answer)
                if wait is None:
                    return answer
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
        answer = self._send(self._emit_request(type_, task, data, event_id))
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
        return self.emit("task.heartbeat", task, heartbeat_data(max_duration))

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
        wait = claim_wait(wait)
        return raise_for(self._send(self._claim_request(task, grant, claim_token, wait)))

    def rotate(self, task: str, grant: str) -> str:
        """Revoke the credential (reason `rotated`), have a fresh one minted, and
        return the task's new claim token (the old one is refused from then on).
        Recovers a lost claim answer or answers a suspected interception."""
        return rotated_token(self._send(self._rotate_request(task, grant)))

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
                if claim_again(exc, end):
                    time.sleep(0.5)
                    continue
                raise
            return claimed_secret(answer)

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


class TaskRun(RunCore[Client]):
    """`with client.task(...) as t`: the running task. `t.id`, `t.deadline`,
    `t.credential(grant)`."""

    def _prepare(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> TaskRun:
        self._begun(self._client.started(self.id, **self._started_args()))
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
                token = self._claim_token_for(grant)
                self._secrets[grant] = self._client.claim_secret(
                    self.id, grant, token, timeout=self._claim_timeout
                )
            return self._secrets[grant]

    def _heartbeats(self) -> None:
        assert self._heartbeat_every is not None
        while not self._stop.wait(self._heartbeat_every):
            try:
                self._beaten(self._client.heartbeat(self.id, max_duration=self._extension()))
            except LeaseholdError as exc:
                self._refused(exc)
                return
            except httpx.HTTPError as exc:
                self._beat_failed(exc)

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
