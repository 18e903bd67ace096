"""Processes the tests start: one way to find a port, start `leasehold ...`, wait
for it, read its output and stop it (its whole group when it has one)."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
CLI = [sys.executable, "-m", "app.cli"]
_GROUPS: set[int] = set()  # pids started as leaders of their own process group


@contextlib.contextmanager
def environment(values: Mapping[str, str], *, settings: bool = False) -> Iterator[None]:
    """These variables in this process's environment (what the processes it starts
    inherit), each restored, or removed, afterwards; `settings`: this process's
    settings are read again on entry and on exit."""
    from app.core.settings import get_settings

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    if settings:
        get_settings.cache_clear()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if settings:
            get_settings.cache_clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll until check() is truthy; fail with the last value."""
    end = time.monotonic() + timeout
    value = None
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s (last: {value!r})")


def spawn(
    args: list[str], log: Path, env: Mapping[str, str] | None = None, *, group: bool = False
) -> subprocess.Popen[bytes]:
    """`python -m app.cli ARGS`, output appended to `log`; with `group`, in a process
    group of its own so stop_process() takes its pool too."""
    proc = subprocess.Popen(
        [*CLI, *args],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=dict(env if env is not None else os.environ),
        start_new_session=group,
    )
    if group:
        _GROUPS.add(proc.pid)
    return proc


def _fail(proc: subprocess.Popen[bytes], what: str, log: Path) -> AssertionError:
    stop_process(proc, timeout=5)
    return AssertionError(f"{what}: {log.read_text()[-2000:]}")


def wait_for_line(
    proc: subprocess.Popen[bytes], log: Path, marker: str, timeout: float = 30, since: int = 0
) -> None:
    """Until `marker` appears in the log after byte `since`; a process that exits or stays
    silent is stopped."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise _fail(proc, f"{proc.args} exited {proc.returncode}", log)
        if marker.encode() in log.read_bytes()[since:]:
            return
        time.sleep(0.1)
    raise _fail(proc, f"{proc.args} did not print {marker!r} within {timeout}s", log)


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 30) -> None:
    """Until `url`/healthz answers 200; a process that exits or never answers is stopped."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise _fail(proc, f"{proc.args} exited {proc.returncode}", log)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise _fail(proc, f"{url}/healthz did not answer within {timeout}s", log)


def start_worker(
    log: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    group: bool = False,
) -> subprocess.Popen[bytes]:
    """A real `leasehold worker ARGS`, once it is ready (said after this start)."""
    since = log.stat().st_size if log.exists() else 0
    proc = spawn(["worker", *args], log, env, group=group)
    wait_for_line(proc, log, "ready.", since=since)
    return proc


def start_api(
    log: Path, env: Mapping[str, str] | None = None, *, group: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    """A real `leasehold api` on a free port, once healthy: (process, URL)."""
    port = free_port()
    proc = spawn(["api", "--port", str(port)], log, env, group=group)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, log)
    return proc, url


def signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout`; a group leader's whole group."""
    group = proc.pid in _GROUPS

    def send(sig: int) -> None:
        if group:
            signal_group(proc, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait()
    if group:
        signal_group(proc, signal.SIGKILL)  # whatever of the group is left


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
