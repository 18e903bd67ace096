"""The asyncio client: the same as Client, as coroutines and `async with`."""

from __future__ import annotations

import asyncio
import contextlib
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


class AsyncClient(ClientCore):
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
        super().__init__(url, key, source, timeout, retries, max_retry_wait)
        self._http = httpx.AsyncClient(base_url=self._config.url, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, request: Request) -> httpx.Response:
        """Client._send, awaiting."""
        attempt = 0
        while True:
            try:
                answer = await self._http.request(**request.send_args(self._timeout))
            except request.retry_errors:
                wait = self._retry_wait(request, attempt, None)
                if wait is None:
                    raise
            else:
                wait = self._retry_wait(request, attempt, answer)
                if wait is None:
                    return answer
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
        answer = await self._send(self._emit_request(type_, task, data, event_id))
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
        return await self.emit("task.heartbeat", task, heartbeat_data(max_duration))

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
        wait = claim_wait(wait)
        return raise_for(await self._send(self._claim_request(task, grant, claim_token, wait)))

    async def rotate(self, task: str, grant: str) -> str:
        """See Client.rotate."""
        return rotated_token(await self._send(self._rotate_request(task, grant)))

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
                if claim_again(exc, end):
                    await asyncio.sleep(0.5)
                    continue
                raise
            return claimed_secret(answer)

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


class AsyncTaskRun(RunCore[AsyncClient]):
    """`async with client.task(...) as t`: the running task."""

    def _prepare(self) -> None:
        self._lock = asyncio.Lock()
        self._beat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncTaskRun:
        self._begun(await self._client.started(self.id, **self._started_args()))
        if self._heartbeat_every:
            self._beat = asyncio.get_running_loop().create_task(self._heartbeats())
        return self

    async def credential(self, grant: str) -> dict[str, Any]:
        """See TaskRun.credential."""
        async with self._lock:
            if grant not in self._secrets:
                token = self._claim_token_for(grant)
                self._secrets[grant] = await self._client.claim_secret(
                    self.id, grant, token, timeout=self._claim_timeout
                )
            return self._secrets[grant]

    async def _heartbeats(self) -> None:
        assert self._heartbeat_every is not None
        while True:
            await asyncio.sleep(self._heartbeat_every)
            try:
                answer = await self._client.heartbeat(self.id, max_duration=self._extension())
                self._beaten(answer)
            except LeaseholdError as exc:
                self._refused(exc)
                return
            except httpx.HTTPError as exc:
                self._beat_failed(exc)

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
