"""LEASEHOLD_EVENT_RATE_LIMIT: events per second per emitter key, as a token bucket.

Each key may send `rate` events a second on average and a burst of
max(1, rate). With a Redis broker the bucket lives in Redis (one Lua script on
Redis's own clock), so the limit holds across every API process; with the
embedded broker it lives in this process. A Redis that cannot be reached, or
answers slower than REDIS_TIMEOUT, must not take event intake down with it: the
limiter then fails open to this process's own bucket (still a limit, per
process), logs a warning and tries Redis again after RETRY_REDIS_AFTER.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script

from app.api.errors import ApiError
from app.core.settings import get_settings

logger = logging.getLogger(__name__)

REDIS_TIMEOUT = 0.25  # seconds; a slow Redis costs an event at most this
RETRY_REDIS_AFTER = 5.0  # seconds on the local bucket after Redis failed
MAX_LOCAL_BUCKETS = 10_000

# KEYS[1] the bucket; ARGV rate (tokens/s), burst. Answers the seconds to wait
# (as text: Lua numbers become integers on the way out), "0" when a token was taken.
_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


def bucket_key(key_id: str) -> str:
    return f"{get_settings().broker_key_prefix}leasehold:ratelimit:{key_id}"


class RateLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        # Per process (a forked worker must not share a socket): url, and the script.
        self._scripts: dict[int, tuple[str, Script]] = {}
        # The event loop's own client (one loop per API process): the check costs the
        # loop one Redis round trip and no thread hand-off. Keyed by the loop it is bound to.
        self._async: tuple[asyncio.AbstractEventLoop, str, AsyncScript] | None = None
        self._redis_down_until = 0.0

    def wait(self, key_id: str, rate: float, redis_url: str | None) -> float:
        """Take one token for `key_id`: 0.0, or the seconds until one is there."""
        burst = max(1.0, rate)
        if redis_url is not None and time.monotonic() >= self._redis_down_until:
            try:
                script = self._script(redis_url)
                return float(script(keys=[bucket_key(key_id)], args=[rate, burst]))
            except redis.RedisError as exc:
                self._fail_open(exc)
        return self._local_wait(key_id, rate, burst)

    def _fail_open(self, exc: Exception) -> None:
        """Redis out of reach: this process limits on its own for a while, and says so."""
        self._redis_down_until = time.monotonic() + RETRY_REDIS_AFTER
        logger.warning(
            "event rate limit: Redis unreachable (%s); limiting per process for %ss",
            type(exc).__name__,
            RETRY_REDIS_AFTER,
        )

    async def wait_async(self, key_id: str, rate: float, redis_url: str) -> float:
        """wait() for the event loop: the same bucket, Redis answers or fails open alike."""
        burst = max(1.0, rate)
        if time.monotonic() >= self._redis_down_until:
            try:
                script = self._async_script(redis_url)
                return float(await script(keys=[bucket_key(key_id)], args=[rate, burst]))
            except (redis.RedisError, OSError) as exc:
                self._fail_open(exc)
        return self._local_wait(key_id, rate, burst)

    def _async_script(self, url: str) -> AsyncScript:
        loop = asyncio.get_running_loop()
        held = self._async
        if held is None or held[0] is not loop or held[1] != url:
            client = aioredis.Redis.from_url(
                url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
            )
            held = self._async = (loop, url, client.register_script(_BUCKET))
        return held[2]

    def _script(self, url: str) -> Script:
        held = self._scripts.get(os.getpid())
        if held is None or held[0] != url:
            client = redis.Redis.from_url(
                url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT
            )
            held = self._scripts[os.getpid()] = (url, client.register_script(_BUCKET))
        return held[1]

    def _local_wait(self, key_id: str, rate: float, burst: float) -> float:
        now = time.monotonic()
        with self._lock:
            if len(self._local) > MAX_LOCAL_BUCKETS:
                # Buckets idle long enough to be full again carry nothing.
                full = burst / rate
                self._local = {k: v for k, v in self._local.items() if now - v[1] < full}
                if len(self._local) > MAX_LOCAL_BUCKETS:
                    self._local.clear()
            tokens, at = self._local.get(key_id, (burst, now))
            tokens = min(burst, tokens + max(0.0, now - at) * rate)
            if tokens >= 1:
                self._local[key_id] = (tokens - 1, now)
                return 0.0
            self._local[key_id] = (tokens, now)
            return (1 - tokens) / rate


limiter = RateLimiter()


def _redis_url() -> str | None:
    url = get_settings().broker_url
    return url if url and url.startswith(("redis://", "rediss://")) else None


async def check_event_rate(key_id: str) -> None:
    """Refuse with 429 and Retry-After when `key_id` is over LEASEHOLD_EVENT_RATE_LIMIT."""
    rate = get_settings().event_rate_limit
    if rate is None:
        return
    url = _redis_url()
    if url is None:
        wait = limiter.wait(key_id, rate, None)
    else:  # on the event loop, non-blocking, bounded by REDIS_TIMEOUT
        wait = await limiter.wait_async(key_id, rate, url)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise ApiError(
            429,
            f"over the event rate limit of {rate:g} per second for this key; retry in {retry} s",
            {"Retry-After": str(retry)},
        )
