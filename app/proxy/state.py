"""What the proxy knows of credentials, and how fast it forgets.

`Gates` reads a credential's state from the ledger (read only) and caches it for at
most CACHE_SECONDS, and only while it is subscribed to the credential notifications
(app/notify.py) that the revoke worker publishes: a message drops that credential's
entry and re-checks the requests it has in flight, a lost subscription drops the
whole cache. In-flight requests are also re-checked every WATCH_SECONDS, so a
lost message still cuts them off within about a second.

`Journal` writes the proxy's audit entries (the only thing it writes) through
`ledger.audit`, in batches, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import redis.asyncio as aioredis
from sqlmodel import select

from app import ledger, notify
from app.core.db import session_scope
from app.core.models import Credential, CredState, Task, TaskState, utcnow

log = logging.getLogger("leasehold.proxy")
T = TypeVar("T")

CACHE_SECONDS = 0.5  # PRODUCT.md: within a second
WATCH_SECONDS = 0.5
MAX_CACHED = 10_000
LEDGER_THREADS = 8
SILENCE = 15.0  # no message (not even a PONG) for this long: the subscription is dead


@dataclass(frozen=True)
class Gate:
    """One credential as the proxy checks it."""

    id: str
    tenant: str
    task_id: str
    profile: str
    issuer: str
    state: str
    task_state: str
    expires_at: datetime | None
    token_digest: str | None

    def live(self, now: datetime | None = None) -> bool:
        return (
            self.issuer == "proxy"
            and self.state == CredState.active
            and self.task_state == TaskState.running
            and self.expires_at is not None
            and self.expires_at > (now or utcnow())
        )

    @property
    def why_not(self) -> str:
        if self.task_state != TaskState.running:
            return f"the task has ended ({self.task_state})"
        if self.state != CredState.active:
            return f"the credential is {self.state}"
        return "the credential has expired"


def read_gate(credential_id: str) -> Gate | None:
    with session_scope() as session:
        row = session.exec(
            select(Credential, Task.state)
            .join(Task, Task.id == Credential.task_id)  # type: ignore[arg-type]
            .where(Credential.id == credential_id)
        ).first()
        if row is None:
            return None
        cred, task_state = row
        return Gate(
            id=cred.id,
            tenant=cred.tenant,
            task_id=cred.task_id,
            profile=cred.profile,
            issuer=cred.issuer,
            state=cred.state,
            task_state=task_state,
            expires_at=cred.expires_at,
            token_digest=cred.token_digest,
        )


_limiter: anyio.CapacityLimiter | None = None


async def in_thread(func: Callable[..., T], *args: Any) -> T:
    """Blocking ledger and Vault calls, on a few threads of their own."""
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(LEDGER_THREADS)
    return await anyio.to_thread.run_sync(functools.partial(func, *args), limiter=_limiter)


class Gates:
    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, Gate | None]] = {}
        self._generation: dict[str, int] = {}
        self._streams: dict[str, set[anyio.CancelScope]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.connected = False

    async def start(self) -> None:
        found = notify.subscription()
        if found is not None:
            self._tasks.append(asyncio.create_task(self._listen(*found)))
        self._tasks.append(asyncio.create_task(self._watch()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def get(self, credential_id: str, *, fresh: bool = False) -> Gate | None:
        hit = self._cache.get(credential_id)
        if hit is not None and not fresh and self.connected and hit[0] > time.monotonic():
            return hit[1]
        generation = self._generation.get(credential_id, 0)
        gate = await in_thread(read_gate, credential_id)
        # Cached only while notifications arrive, and not if one came during the read.
        if self.connected and self._generation.get(credential_id, 0) == generation:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[credential_id] = (time.monotonic() + CACHE_SECONDS, gate)
        return gate

    @contextlib.contextmanager
    def streaming(self, credential_id: str) -> Iterator[anyio.CancelScope]:
        """A cancel scope for one request, cancelled when its credential stops being live."""
        with anyio.CancelScope() as scope:
            self._streams.setdefault(credential_id, set()).add(scope)
            try:
                yield scope
            finally:
                scopes = self._streams.get(credential_id)
                if scopes is not None:
                    scopes.discard(scope)
                    if not scopes:
                        del self._streams[credential_id]

    async def _recheck(self, credential_id: str, *, fresh: bool) -> None:
        if credential_id not in self._streams:
            return
        try:
            gate = await self.get(credential_id, fresh=fresh)
        except Exception as exc:  # the ledger unreachable: fail closed
            log.warning("proxy: cannot re-check a credential: %s", type(exc).__name__)
            gate = None
        if gate is None or not gate.live():
            for scope in list(self._streams.get(credential_id, ())):
                scope.cancel()

    def _changed(self, credential_id: str) -> None:
        self._generation[credential_id] = self._generation.get(credential_id, 0) + 1
        if len(self._generation) > MAX_CACHED:
            self._generation.clear()
        self._cache.pop(credential_id, None)
        if credential_id in self._streams:
            asyncio.get_running_loop().create_task(self._recheck(credential_id, fresh=True))

    def _lost(self) -> None:
        self.connected = False
        self._cache.clear()

    async def _watch(self) -> None:
        """Every in-flight request's credential, re-checked (a lost message's backstop)."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            for credential_id in list(self._streams):
                await self._recheck(credential_id, fresh=False)

    async def _listen(self, url: str, channel: str) -> None:
        while True:
            client = aioredis.Redis.from_url(
                url,
                client_name=f"leasehold-proxy-{os.getpid()}",
                socket_connect_timeout=5,
                socket_keepalive=True,
            )
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    heard = last_ping = time.monotonic()
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        now = time.monotonic()
                        if message is not None:
                            heard = now
                            kind = message.get("type")
                            if kind == "subscribe":
                                self.connected = True
                            elif kind == "message":
                                self._changed(message["data"].decode())
                        if now - heard > SILENCE:
                            raise ConnectionError("no answer from Redis")
                        if now - last_ping > SILENCE / 3:
                            await pubsub.ping()
                            last_ping = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("proxy: notifications lost (%s); cache dropped", type(exc).__name__)
            finally:
                self._lost()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(1)


class Journal:
    """Audit entries, queued by requests and written in batches by one task."""

    def __init__(self, *, batch: int = 200, limit: int = 10_000) -> None:
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=limit)
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        self._writing = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, *, grace: float = 5.0) -> None:
        end = time.monotonic() + grace
        while (self._writing or not self._queue.empty()) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._flush()

    async def add(self, action: str, gate: Gate, *, reason: str | None, detail: str) -> None:
        entry = {
            "action": action,
            "actor": "proxy",
            "tenant": gate.tenant,
            "task_id": gate.task_id,
            "credential_id": gate.id,
            "reason": reason,
            "detail": detail,
            "now": utcnow(),
        }
        await self._queue.put(entry)  # a full queue slows requests down, never drops

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            self._writing = True
            try:
                await self._write([first, *self._drain()])
            finally:
                self._writing = False

    def _drain(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        while len(entries) < self._batch and not self._queue.empty():
            entries.append(self._queue.get_nowait())
        return entries

    async def _flush(self) -> None:
        while not self._queue.empty():
            await self._write(self._drain())

    async def _write(self, entries: list[dict[str, Any]]) -> None:
        while True:
            try:
                await in_thread(_write_entries, entries)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the ledger unreachable: keep them and try again
                log.error("proxy: audit entries not written yet: %s", type(exc).__name__)
                await asyncio.sleep(1)


def _write_entries(entries: list[dict[str, Any]]) -> None:
    with session_scope() as session:
        for entry in entries:
            ledger.audit(session, **entry)
