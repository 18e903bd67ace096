"""Capped exponential backoff with full jitter for Celery retries."""

from __future__ import annotations

import random


def backoff(retries: int, *, base: float = 0.5, cap: float = 60.0) -> float:
    return random.uniform(base, min(cap, base * 2**retries))  # noqa: S311  (jitter, not crypto)
