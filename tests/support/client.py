"""What the client tests share: a real `leasehold api` process on the run's ledger."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.procs import free_port, start_api, stop_process
from tests.support.world import HOME


@contextmanager
def leasehold_api() -> Iterator[str]:
    """A real `leasehold api --port P` on the test run's ledger; its URL."""
    proc, url = start_api(HOME / f"client-api-{free_port()}.log")
    try:
        yield url
    finally:
        stop_process(proc)
