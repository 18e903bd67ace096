"""The asyncio client: the same as Client, as coroutines and `async with`."""

from __future__ import annotations

import asyncio
import contextlib
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
from .client import CLAIM_RETRY, ROTATE_RETRY, ending, extension, log


class AsyncClient:
    """Client's asyncio twin: every method is a coroutine; `task(...)` is used with
    `async with`, and a cancelled block sends `task.cancelled`."""

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
        self._http = httpx.AsyncClient(base_url=self._config.url, timeout=timeout)

    def __repr__(self) -> str:  # never the key
        return f"AsyncClient(url={self._config.url!r}, source={self._config.source!r})"

    @property
    def url(self) -> str:
        return self._config.url

    @property
    def source(self) -> str:
        return self._config.source

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(
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
                answer = await self._http.request(
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
            await asyncio.sleep(wait)
            attempt += 1

    async def emit(
        self,
        type_: str,
        task: str,
        data: dict[str, Any] | None = None,
        *,
        event_id: str | None = None,
    ) -> TaskAnswer:
        """See Client.emit."""
        kind = type_ if type_.startswith("task.") else f"task.{type_}"
        event = self._config.event(kind, task, data, event_id)
        answer = await self._request("POST", "/v1/events", headers=self._config.auth(), json=event)
        return task_answer(task, raise_for(answer))

    async def started(
        self,
        task: str,
        *,
        grants: dict[str, str],
        max_duration: int,
        workload: str | None = None,
        parent: str | None = None,
    ) -> TaskAnswer:
        """See Client.started."""
        data = started_data(grants, max_duration, workload, parent)
        return await self.emit("task.started", task, data)

    async def heartbeat(self, task: str, *, max_duration: int | None = None) -> TaskAnswer:
        """See Client.heartbeat."""
        data = {"max_duration": int(max_duration)} if max_duration is not None else {}
        return await self.emit("task.heartbeat", task, data)

    async def succeeded(self, task: str) -> TaskAnswer:
        return await self.emit("task.succeeded", task, {})

    async def failed(self, task: str) -> TaskAnswer:
        return await self.emit("task.failed", task, {})

    async def cancelled(self, task: str) -> TaskAnswer:
        return await self.emit("task.cancelled", task, {})

    async def claim(
        self, task: str, grant: str, claim_token: str, *, wait: float = 10
    ) -> dict[str, Any]:
        """See Client.claim."""
        wait = max(0.0, min(float(wait), MAX_CLAIM_WAIT))
        answer = await self._request(
            "POST",
            f"/v1/tasks/{segment(task)}/credentials/{segment(grant)}/claim",
            headers={"Authorization": f"Bearer {claim_token}"},
            params={"wait": wait} if wait else None,
            timeout=self._timeout + wait,
            retry_errors=NOT_SENT,
            retry_statuses=CLAIM_RETRY,
        )
        return raise_for(answer)

    async def rotate(self, task: str, grant: str) -> str:
        """See Client.rotate."""
        answer = await self._request(
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

    async def claim_secret(
        self, task: str, grant: str, claim_token: str, *, timeout: float = 60
    ) -> dict[str, Any]:
        """See Client.claim_secret."""
        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            try:
                answer = await self.claim(task, grant, claim_token, wait=max(0.0, remaining))
            except LeaseholdError as exc:
                if exc.status == 409 and end - time.monotonic() > 0.5:
                    await asyncio.sleep(0.5)
                    continue
                raise
            secret = answer.get("secret")
            if not isinstance(secret, dict):
                raise LeaseholdError(200, "the claim answered no secret")
            return secret

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
    ) -> AsyncTaskRun:
        """See Client.task; use with `async with`. `await t.credential(grant)`."""
        return AsyncTaskRun(
            self,
            task,
            grants=grants,
            max_duration=max_duration,
            workload=workload,
            parent=parent,
            heartbeat_every=heartbeat_every,
            claim_timeout=claim_timeout,
        )


class AsyncTaskRun:
    """`async with client.task(...) as t`: the running task."""

    def __init__(
        self,
        client: AsyncClient,
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
        self._lock = asyncio.Lock()
        self._beat: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self.deadline: datetime | None = None
        self.answer: TaskAnswer | None = None

    def __repr__(self) -> str:
        return f"AsyncTaskRun(id={self.id!r}, deadline={self.deadline!r})"

    async def __aenter__(self) -> AsyncTaskRun:
        self._t0 = time.monotonic()
        self.answer = await self._client.started(
            self.id,
            grants=self._grants,
            max_duration=self._max_duration,
            workload=self._workload,
            parent=self._parent,
        )
        self._token, self.deadline = self.answer.claim_token, self.answer.deadline
        if self._heartbeat_every:
            self._beat = asyncio.get_running_loop().create_task(self._heartbeats())
        return self

    async def credential(self, grant: str) -> dict[str, Any]:
        """See TaskRun.credential."""
        async with self._lock:
            if grant not in self._secrets:
                if grant not in self._grants:
                    raise KeyError(f"the task has no grant {grant!r}")
                if self._token is None:
                    raise LeaseholdError(410, "the task has ended; nothing to claim")
                self._secrets[grant] = await self._client.claim_secret(
                    self.id, grant, self._token, timeout=self._claim_timeout
                )
            return self._secrets[grant]

    async def _heartbeats(self) -> None:
        assert self._heartbeat_every is not None
        while True:
            await asyncio.sleep(self._heartbeat_every)
            try:
                answer = await self._client.heartbeat(
                    self.id, max_duration=extension(self._t0, self._max_duration)
                )
                self.deadline = answer.deadline or self.deadline
            except LeaseholdError as exc:
                log.warning("leasehold: heartbeat for %r refused (%s); stopping", self.id, exc)
                return
            except httpx.HTTPError as exc:
                log.warning("leasehold: heartbeat for %r failed: %s", self.id, type(exc).__name__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        self._secrets.clear()
        kind = ending(exc_type)
        try:
            # Shielded: a cancelled block still gets its end sent.
            await asyncio.shield(self._client.emit(kind, self.id, {}))
        except Exception:
            if exc_type is None:
                raise
            log.exception("leasehold: could not send %s for %r", kind, self.id)
