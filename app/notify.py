"""Credential change notifications, so long-polling claims wait on a message.

Workers publish a credential id (never a secret) on a Redis channel; the API
process keeps one subscription and wakes the waiters of that id. Without
Redis (the embedded broker) waiters fall back to a short asyncio sleep, which
still holds no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator

import redis
import redis.asyncio as aioredis

from app.core.settings import get_settings

logger = logging.getLogger(__name__)
_clients: dict[int, redis.Redis] = {}
# How long this process remembers that a credential changed: a claim asks about the
# time since its first read began (a thread hop ago); the 2 s re-check covers the rest.
REMEMBER_SECONDS = 30.0
MAX_REMEMBERED = 10_000


def listener_name() -> str:
    """The API process's subscription as CLIENT LIST shows it."""
    return f"leasehold-notify-{os.getpid()}"


def _channel() -> str:
    return f"{get_settings().broker_key_prefix}leasehold:credentials"


def _redis_url() -> str | None:
    url = get_settings().broker_url
    return url if url and url.startswith(("redis://", "rediss://")) else None


def subscription() -> tuple[str, str] | None:
    """(Redis URL, channel) that credential changes are published on; None without Redis.
    For other processes that listen (`leasehold proxy`)."""
    url = _redis_url()
    return None if url is None else (url, _channel())


def credential_changed(credential_id: str) -> None:
    url = _redis_url()
    if url is None:
        return
    client = _clients.get(os.getpid())
    if client is None:
        timeout = get_settings().backend_timeout
        client = _clients[os.getpid()] = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
    try:
        client.publish(_channel(), credential_id)
    except redis.RedisError as exc:  # a waiter then finds out by its periodic check
        logger.warning("notify failed: %s", type(exc).__name__)


class Waiters:
    """One subscription per API process; futures per credential id."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        # credential id -> when its last notification arrived (oldest first)
        self._changed: dict[str, float] = {}

    async def start(self) -> None:
        url = _redis_url()
        if url is not None and self._task is None:
            self._task = asyncio.create_task(self._listen(url))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _listen(self, url: str) -> None:
        while True:
            # One client per attempt, closed with it: a reconnect leaks no connection pool.
            client = aioredis.Redis.from_url(url, client_name=listener_name())
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(_channel())
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._wake(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect; waiters still poll meanwhile
                logger.warning("notification listener: %s", type(exc).__name__)
                await asyncio.sleep(1)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()

    def _wake(self, credential_id: str) -> None:
        now = time.monotonic()
        changed = self._changed
        changed.pop(credential_id, None)
        changed[credential_id] = now
        while changed:
            oldest = next(iter(changed))
            if changed[oldest] >= now - REMEMBER_SECONDS and len(changed) <= MAX_REMEMBERED:
                break
            del changed[oldest]
        for event in self._events.get(credential_id, ()):
            event.set()

    @staticmethod
    def clock() -> float:
        return time.monotonic()

    def notified_since(self, credential_id: str, since: float) -> bool:
        """Whether a change of `credential_id` arrived after `since` (clock()). Without
        a listener nothing arrives: True, so the caller re-checks the ledger itself."""
        if self._task is None:
            return True
        at = self._changed.get(credential_id)
        return at is not None and at >= since

    @contextlib.contextmanager
    def watch(self, credential_id: str) -> Iterator[asyncio.Event]:
        """Register interest first, then re-check the ledger: no wake-up is missed."""
        event = asyncio.Event()
        self._events.setdefault(credential_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._events.get(credential_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._events[credential_id]

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        """Until woken or `timeout`; without Redis, a short sleep (still no thread held)."""
        # A re-check every 2 s covers a message lost while the listener reconnects.
        limit = min(timeout, 2.0 if self._task is not None else 0.1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), limit)
        event.clear()


waiters = Waiters()
