"""A virtualenv per orchestrator (Airflow, Prefect) installed from its committed lock
in sdk/integrations/: they pin their own FastAPI and SQLAlchemy, so they cannot
share the server's environment. Kept in `.venv-<name>/` at the repo root between
runs while the lock and the interpreter are the same; leasehold-client is
reinstalled from sdk/ every run. A failed install fails the test, never skips it."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.support.world import HOME, ROOT

INSTALL_TIMEOUT = 900


def _run(cmd: list[str], what: str, timeout: float) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "is ignored" not in ln]
        raise AssertionError(f"{what} failed ({done.returncode}):\n" + "\n".join(lines[-40:]))


def orchestrator_python(name: str) -> Path:
    """The python of `.venv-<name>/` with the lock's packages and this leasehold-client."""
    lock = ROOT / "sdk" / "integrations" / f"{name}.lock"
    assert lock.is_file(), f"{lock} is missing"
    venv = ROOT / f".venv-{name}"
    python = venv / "bin" / "python"
    marker = venv / "lock.sha256"
    digest = hashlib.sha256(lock.read_bytes() + sys.version.encode()).hexdigest()
    if not (python.exists() and marker.exists() and marker.read_text() == digest):
        shutil.rmtree(venv, ignore_errors=True)
        began = time.monotonic()
        try:
            _run([sys.executable, "-m", "venv", str(venv)], f"creating {venv}", 120)
            # The lock is a full `pip freeze`: no resolution, every version pinned.
            _run(
                [str(python), "-m", "pip", "install", "-q", "--no-deps", "-r", str(lock)],
                f"installing {lock.name}",
                INSTALL_TIMEOUT,
            )
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)  # the next run starts afresh
            raise
        marker.write_text(digest)
        print(f"\n{venv.name}: installed {lock.name} in {time.monotonic() - began:.0f}s")
    sdk = HOME / f"{name}-sdk"
    shutil.rmtree(sdk, ignore_errors=True)
    shutil.copytree(ROOT / "sdk", sdk, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(sdk)],
        "installing leasehold-client",
        300,
    )
    return python
