"""What the client tests share: a real `leasehold api` process, and reading lines
from a subprocess with a bound."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
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
    """Lines of proc's stdout up to and including the first one holding `marker`
    (read by a thread: a line already buffered is never waited for again)."""
    assert proc.stdout is not None
    lines_q: queue.Queue[str | None] = getattr(proc, "_lines", None) or queue.Queue()
    if not hasattr(proc, "_lines"):
        proc._lines = lines_q  # type: ignore[attr-defined]
        stdout = proc.stdout

        def pump() -> None:
            for line in stdout:
                lines_q.put(line.rstrip("\n"))
            lines_q.put(None)

        threading.Thread(target=pump, daemon=True).start()
    lines: list[str] = []
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        try:
            line = lines_q.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} not printed within {timeout}s: {lines}")
