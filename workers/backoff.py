"""Capped exponential backoff with full jitter for Celery retries."""

from __future__ import annotations

import random

from app.issuers.errors import TemporaryIssuerError


def backoff(retries: int, *, base: float = 0.5, cap: float = 60.0) -> float:
    return random.uniform(base, min(cap, base * 2**retries))  # noqa: S311  (jitter, not crypto)


def retry_in(exc: BaseException, retries: int) -> float:
    """How long to wait before the next try: the backend's own delay when it named
    one (TemporaryIssuerError.delay, already bounded), else the backoff."""
    if isinstance(exc, TemporaryIssuerError) and exc.delay is not None:
        return exc.delay
    return backoff(retries)
