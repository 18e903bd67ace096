"""What the client tests share: a real `leasehold api` process, and reading lines
from a subprocess with a bound."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from tests.conftest import HOME, ROOT, stop_process, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def leasehold_api() -> Iterator[str]:
    """A real `leasehold api --port P` on the test run's ledger; its URL."""
    port = free_port()
    log = HOME / f"client-api-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api", "--port", str(port)],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"api exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, timeout=30, interval=0.1)
        yield url
    finally:
        stop_process(proc)


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 60) -> list[str]:
    """Lines of proc's stdout up to and including the first one holding `marker`."""
    assert proc.stdout is not None
    lines: list[str] = []
    end = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < end:
            if not sel.select(timeout=max(0.0, end - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if marker in line:
                return lines
    raise AssertionError(f"{marker!r} not printed within {timeout}s: {lines}")
