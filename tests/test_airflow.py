"""leasehold_client.airflow in a real Airflow 3 (its own virtualenv from
sdk/integrations/airflow.lock, SQLite metadata, `dag.test()`) against a real
`leasehold api` and worker: sdk/examples/airflow_dag.py's tasks read the reports
table with their own PostgreSQL login, revoked when each task ends, with its fate."""

from __future__ import annotations

import os
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

DAG = "leasehold_report"


@pytest.fixture(scope="module")
def api_url(worker: Path) -> Iterator[str]:
    with leasehold_api() as url:
        yield url


def test_dag_tasks_hold_a_credential_while_they_run(api_url: str, keys: dict[str, str]) -> None:
    python = orchestrator_python("airflow")
    home = HOME / "airflow"
    (home / "dags").mkdir(parents=True)
    dag_file = home / "dags" / "airflow_dag.py"
    shutil.copy(ROOT / "sdk" / "examples" / "airflow_dag.py", dag_file)
    env = {
        "PATH": f"{python.parent}:/usr/bin:/bin",
        "HOME": str(home),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "LEASEHOLD_URL": api_url,
        "LEASEHOLD_KEY": keys["emitter"],
        "LEASEHOLD_SOURCE": "pytest://airflow",
        "TZ": os.environ.get("TZ", "UTC"),
    }
    migrate = subprocess.run(
        [str(python.parent / "airflow"), "db", "migrate"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    run = subprocess.run(
        [str(python), str(dag_file)], env=env, cwd=home, capture_output=True, text=True, timeout=600
    )
    out = run.stdout + run.stderr
    (HOME / "airflow-dag-test.log").write_text(out)
    # Each task's own login read the table inside the task.
    assert "report read 1 reports" in out, out[-4000:]
    assert "broken read 1 reports" in out, out[-4000:]
    assert "RuntimeError: the report is broken" in out

    with session_scope() as session:
        # (in Python: LIKE would read a "_" in the name as a wildcard)
        names = [n for n in session.exec(select(Task.name)) if n.startswith(f"{DAG}/")]
    by_task = {name.split("/")[-3]: name for name in names}
    assert sorted(by_task) == ["broken", "report"], names
    for task_id, name in by_task.items():
        dag_id, run_id, tid, map_index, attempt = name.split("/")
        assert (dag_id, tid, map_index, attempt) == (DAG, task_id, "-1", "try-1")
        assert run_id.startswith("manual__")

    for task_id, reason in (("report", "succeeded"), ("broken", "failed")):
        name = by_task[task_id]

        def revoked(name: str = name) -> bool:
            creds = credentials_of("t1", name)
            return len(creds) == 1 and creds[0].state == "revoked"

        wait_until(revoked, timeout=15)
        (cred,) = credentials_of("t1", name)
        assert cred.claimed_at is not None  # claimed by the task itself
        assert cred.revoke_reason == reason
        assert not role_exists(cred.backend_name)
        with session_scope() as session:
            kinds = list(session.exec(select(Event.type).where(Event.subject == name)))
        assert sorted(kinds) == sorted(["task.started", f"task.{reason}"])
