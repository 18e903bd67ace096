"""`leasehold run`: any command wrapped in a task (PRODUCT.md "Running a command").

Uses the client package only (LEASEHOLD_URL, LEASEHOLD_KEY): `task.started`, a claim
per grant, the command with its credentials in the environment and in a private
file, heartbeats while it runs, and the task's end from the command's fate.

- `--max-duration` not given: the task is started asking for 31 days, and the
  server's 422 names the smallest `max_ttl` of the grants' profiles (its `max_ttl`
  member); the start is sent again with it (a refused event stores nothing).
- The child's environment is this one without any `LEASEHOLD_*` variable, plus
  `LEASEHOLD_<GRANT>_<FIELD>`, `LEASEHOLD_CREDENTIALS` and, for proxy grants, the
  forward-mode proxy (`HTTP(S)_PROXY`) and a CA bundle: the system's roots (and a
  bundle `SSL_CERT_FILE` named) plus the task's CA.
- Files live in a private (0700) directory removed when the command ends, also on
  an error or a signal; only SIGKILL of this process leaves it behind.
- SIGINT, SIGTERM and SIGHUP are forwarded to the command (SIGINT not when it came
  from the terminal, which sent it to the command already), which is killed after
  `grace` seconds; the task is then `cancelled`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from leasehold_client import Client, LeaseholdError

MONTH = 31 * 24 * 3600  # no profile's max_ttl is longer (app/profiles.py)
SOURCE = "leasehold-run"
GUIDE = Path(__file__).with_name("agent_guide.md")
FAILED_TO_START = 1  # the task could not start or a claim was refused: the command never ran
_FIELD = re.compile(r"[^A-Za-z0-9_]")


class RunError(Exception):
    """leasehold run itself could not go on (said on stderr, never with a secret)."""


def env_name(grant: str, field: str) -> str:
    """LEASEHOLD_<GRANT>_<FIELD>: upper-cased, `-` and `.` (and anything else) as `_`."""
    return f"LEASEHOLD_{_FIELD.sub('_', grant).upper()}_{_FIELD.sub('_', field).upper()}"


def default_task_id() -> str:
    return f"run/{socket.gethostname()}/{secrets.token_hex(6)}"


def system_roots() -> str:
    """The system's trusted roots as PEM text, and those of a bundle SSL_CERT_FILE names."""
    paths = ssl.get_default_verify_paths()
    found = []
    for name in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if name and name not in found and Path(name).is_file():
            found.append(name)
    return "".join(Path(name).read_text(errors="replace").rstrip() + "\n" for name in found)


def _private_file(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)


def child_environment(
    base: dict[str, str], secrets_by_grant: dict[str, dict[str, Any]], workdir: Path
) -> dict[str, str]:
    env = {k: v for k, v in base.items() if not k.upper().startswith("LEASEHOLD_")}
    credentials = workdir / "credentials.json"
    _private_file(credentials, json.dumps(secrets_by_grant))
    env["LEASEHOLD_CREDENTIALS"] = str(credentials)
    if GUIDE.is_file():
        env["LEASEHOLD_GUIDE"] = str(GUIDE)
    cas: list[str] = []
    proxy: str | None = None
    for grant, secret in secrets_by_grant.items():
        for field, value in secret.items():
            if value is None:
                continue
            env[env_name(grant, field)] = value if isinstance(value, str) else json.dumps(value)
        if {"proxy_url", "token"} <= set(secret):  # a proxy grant: forward mode too
            if isinstance(secret.get("ca"), str) and secret["ca"] not in cas:
                cas.append(secret["ca"])
            if proxy is None:
                parts = urlsplit(secret["proxy_url"])
                proxy = f"{parts.scheme}://lh:{quote(secret['token'], safe='')}@{parts.netloc}"
    if proxy is not None:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[name] = proxy
    if cas:
        bundle = workdir / "ca-bundle.pem"
        _private_file(bundle, system_roots() + "".join(cas))
        for name in (
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "CURL_CA_BUNDLE",
            "NODE_EXTRA_CA_CERTS",
        ):
            env[name] = str(bundle)
    return env


class Heartbeats(threading.Thread):
    """Keeps the deadline `max_duration` ahead, never past the known max_ttl."""

    def __init__(self, client: Client, task: str, max_duration: int, cap: int | None) -> None:
        super().__init__(name="leasehold-run heartbeat", daemon=True)
        self.client, self.task = client, task
        self.max_duration, self.cap = max_duration, cap
        self.every = min(60.0, max(1.0, max_duration / 3))
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            asked = math.ceil(time.monotonic() - self.t0) + self.max_duration
            if self.cap is not None:
                asked = min(asked, self.cap)
            try:
                self.client.heartbeat(self.task, max_duration=asked)
            except LeaseholdError as exc:
                print(f"leasehold run: heartbeat refused ({exc}); stopping", file=sys.stderr)
                return
            except httpx.HTTPError as exc:
                print(f"leasehold run: heartbeat failed: {type(exc).__name__}", file=sys.stderr)


def start(
    client: Client,
    task: str,
    grants: dict[str, str],
    max_duration: int | None,
    workload: str | None,
) -> tuple[str, int, int | None]:
    """`task.started`: (claim token, max_duration, the max_ttl when the server said it)."""
    asked = max_duration if max_duration is not None else MONTH
    try:
        answer = client.started(task, grants=grants, max_duration=asked, workload=workload)
        cap = asked if max_duration is None else None
    except LeaseholdError as exc:
        limit = exc.body.get("max_ttl")
        if max_duration is not None or exc.status != 422 or not isinstance(limit, int):
            raise
        answer = client.started(task, grants=grants, max_duration=limit, workload=workload)
        asked, cap = limit, limit
    if not answer.claim_token:
        raise RunError("the server answered no claim token (did this task run already?)")
    return answer.claim_token, asked, cap


class Child:
    """The command, its signals forwarded, killed `grace` seconds after the first."""

    def __init__(self, command: Sequence[str], env: dict[str, str], grace: float) -> None:
        self.grace = grace
        self.interrupted: int | None = None
        self.kill_at: float | None = None
        self.proc = subprocess.Popen(list(command), env=env)

    def _from_terminal(self, signum: int) -> bool:
        """A Ctrl-C at the terminal reached the child (same foreground group) already."""
        if signum != signal.SIGINT:
            return False
        try:
            return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
        except (OSError, ValueError):
            return False

    def on_signal(self, signum: int, _: FrameType | None) -> None:
        if self.interrupted is None:
            self.interrupted = signum
            self.kill_at = time.monotonic() + self.grace
        if not self._from_terminal(signum):
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def wait(self) -> int:
        while True:
            try:
                return self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self.kill_at is not None and time.monotonic() > self.kill_at:
                    self.proc.kill()
                    self.kill_at = None


def _interrupt(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(
    command: Sequence[str],
    *,
    grants: dict[str, str],
    task: str | None = None,
    max_duration: int | None = None,
    workload: str | None = None,
    grace: float = 10.0,
    claim_timeout: float = 60.0,
) -> int:
    """The whole of `leasehold run`; the exit code."""
    if not command:
        raise RunError("no command given (leasehold run --grant NAME=PROFILE -- COMMAND ...)")
    task = task or default_task_id()
    with Client(source=SOURCE) as client:
        token, asked, cap = start(client, task, grants, max_duration, workload)
        workdir = Path(tempfile.mkdtemp(prefix="leasehold-run-"))  # 0700
        beat: Heartbeats | None = None
        fate = "task.failed"
        previous: dict[int, Any] = {}
        for early in (signal.SIGTERM, signal.SIGHUP):  # until the command runs: cancelled
            previous[early] = signal.signal(early, _interrupt)
        try:
            got: dict[str, dict[str, Any]] = {}
            for grant in grants:
                got[grant] = client.claim_secret(task, grant, token, timeout=claim_timeout)
            env = child_environment(dict(os.environ), got, workdir)
            got.clear()
            beat = Heartbeats(client, task, asked, cap)
            beat.start()
            try:
                child = Child(command, env, grace)
            except FileNotFoundError:
                print(f"leasehold run: {command[0]}: command not found", file=sys.stderr)
                return 127
            except PermissionError:
                print(f"leasehold run: {command[0]}: not executable", file=sys.stderr)
                return 126
            finally:
                env.clear()
            for forwarded in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                handler = signal.signal(forwarded, child.on_signal)
                previous.setdefault(forwarded, handler)
            returncode = child.wait()
            if child.interrupted is not None or returncode < 0:
                fate = "task.cancelled"
            elif returncode == 0:
                fate = "task.succeeded"
            return exit_code(returncode)
        except KeyboardInterrupt:
            fate = "task.cancelled"
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if beat is not None:
                beat.stop.set()
            shutil.rmtree(workdir, ignore_errors=True)
            try:
                client.emit(fate, task, {})
            except (LeaseholdError, httpx.HTTPError) as exc:
                # The deadline still ends the task and revokes what it holds.
                print(f"leasehold run: could not send {fate}: {exc}", file=sys.stderr)
