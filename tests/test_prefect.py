"""leasehold_client.prefect in a real Prefect 3 (its own virtualenv from
sdk/integrations/prefect.lock, a temporary local server on SQLite) against a real
`leasehold api` and worker: sdk/examples/prefect_flow.py's flow and tasks read the
reports table with their own PostgreSQL login, revoked when each run ends, with its
fate."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from app.core.db import session_scope
from app.core.models import Event, Task
from tests.support.api import credentials_of, role_exists
from tests.support.client import leasehold_api
from tests.support.procs import wait_until
from tests.support.venvs import orchestrator_python
from tests.support.world import HOME, ROOT

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

FLOW = "leasehold-report"


@pytest.fixture(scope="module")
def api_url(worker: Path) -> Iterator[str]:
    with leasehold_api() as url:
        yield url


def test_flow_and_tasks_hold_a_credential_while_they_run(
    api_url: str, keys: dict[str, str]
) -> None:
    python = orchestrator_python("prefect")
    home = HOME / "prefect"
    home.mkdir()
    flow_file = home / "prefect_flow.py"
    shutil.copy(ROOT / "sdk" / "examples" / "prefect_flow.py", flow_file)
    env = {
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        # No PREFECT_API_URL: Prefect runs a temporary local server on SQLite.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "LEASEHOLD_URL": api_url,
        "LEASEHOLD_KEY": keys["emitter"],
        "LEASEHOLD_SOURCE": "pytest://prefect",
    }
    run = subprocess.run(
        [str(python), str(flow_file)],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout + run.stderr
    (HOME / "prefect-flow.log").write_text(out)
    assert run.returncode == 0, out[-4000:]
    # Each run's own login read the table inside the flow and the tasks.
    for who in ("flow", "report", "broken"):
        assert f"{who} read 1 reports" in out, out[-4000:]
    assert "broken ended FAILED" in out, out[-4000:]

    with session_scope() as session:
        # (in Python: LIKE would read a "_" in the name as a wildcard)
        names = [n for n in session.exec(select(Task.name)) if n.startswith(f"{FLOW}/")]
    flows = [n for n in names if n.count("/") == 2]
    tasks = {n.split("/")[2]: n for n in names if n.count("/") == 4}
    assert len(flows) == 1 and sorted(tasks) == ["broken", "report"], names
    flow_run_id = flows[0].split("/")[1]
    for name in tasks.values():
        assert name.split("/")[1] == flow_run_id and name.endswith("/try-1")

    expected = [
        (flows[0], "succeeded"),
        (tasks["report"], "succeeded"),
        (tasks["broken"], "failed"),
    ]
    for name, reason in expected:

        def revoked(name: str = name) -> bool:
            creds = credentials_of("t1", name)
            return len(creds) == 1 and creds[0].state == "revoked"

        wait_until(revoked, timeout=15)
        (cred,) = credentials_of("t1", name)
        assert cred.claimed_at is not None  # claimed by the run itself
        assert cred.revoke_reason == reason, name
        assert not role_exists(cred.backend_name)
        with session_scope() as session:
            kinds = list(session.exec(select(Event.type).where(Event.subject == name)))
        assert sorted(kinds) == sorted(["task.started", f"task.{reason}"])
