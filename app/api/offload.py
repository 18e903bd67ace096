"""The hot routes' blocking work (ledger, broker) on a thread pool of their own.

asyncio's executor hand-off (a C SimpleQueue) costs the event loop about a third of
anyio's per-thread Queue and Condition (run_in_threadpool), which showed as ~6% of the
API's CPU under load. Each process (and each forked child) gets its own pools.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, TypeVarTuple

Ts = TypeVarTuple("Ts")
T = TypeVar("T")
# As many threads as anyio's default limiter gave these routes before.
HOT_THREADS = 40

_lock = threading.Lock()
_pools: dict[tuple[int, str], ThreadPoolExecutor] = {}


def pool(name: str, threads: int) -> ThreadPoolExecutor:
    key = (os.getpid(), name)
    executor = _pools.get(key)
    if executor is None:
        with _lock:
            executor = _pools.get(key)
            if executor is None:
                executor = _pools[key] = ThreadPoolExecutor(threads, f"leasehold-{name}")
    return executor


async def run_in(executor: ThreadPoolExecutor, func: Callable[[*Ts], T], *args: *Ts) -> T:
    """func(*args) in one of `executor`'s threads, with the caller's contextvars."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, func, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


async def run(func: Callable[[*Ts], T], *args: *Ts) -> T:
    """func(*args) on the hot routes' pool."""
    return await run_in(pool("hot", HOT_THREADS), func, *args)
