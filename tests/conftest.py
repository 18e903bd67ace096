"""Session fixtures: the run's services start when a test first asks for them.

The run's environment (LEASEHOLD_*) is set at configure time, which is cheap;
OpenBao, the databases and the migration start with the `services` fixture,
the Celery worker with `worker`. A test that needs only Python needs neither
PostgreSQL nor OpenBao. Helpers live in tests/support/, never here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import world
from tests.support.procs import start_worker, stop_process


def pytest_configure(config: pytest.Config) -> None:
    world.configure()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # The run's logs stay behind only when something failed, to be read.
    if exitstatus == 0:
        shutil.rmtree(world.HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def services() -> Iterator[world.World]:
    """OpenBao (seeded), the ledger (migrated) and the data database, for the session."""
    started = world.World()
    yield started
    started.stop()


@pytest.fixture(scope="session")
def openbao(services: world.World) -> Any:
    """The session's OpenBao dev server (one per session)."""
    return services.bao


@pytest.fixture(scope="session")
def installation_id(services: world.World) -> str:
    # The session ledger's, read when it was created: a module's private ledger may
    # hold os.environ when a session fixture is first asked for.
    return services.installation_id


@pytest.fixture(scope="session")
def data_db(services: world.World) -> str:
    return world.DATA_DB


@pytest.fixture(scope="session")
def home() -> Path:
    return world.HOME


@pytest.fixture(scope="session")
def worker(installation_id: str) -> Iterator[Path]:
    """A real Celery worker (two processes, the scheduler inside) on the real broker."""
    log = world.HOME / "worker.log"
    # The session's own environment, whenever this is first asked for.
    proc = start_worker(log, "--concurrency", "2", "--beat", env=world.SESSION_ENV)
    yield log
    stop_process(proc)


@pytest.fixture(scope="session")
def app_client(worker: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from app.api import create_app

    with TestClient(create_app()) as client:
        yield client


@pytest.fixture(scope="session")
def keys(installation_id: str) -> dict[str, str]:
    from app.api.auth import create_key
    from app.core.db import session_scope
    from app.core.models import Role

    made: dict[str, str] = {}
    with session_scope() as session:
        for name, role, tenant in (
            ("emitter", Role.emitter, "t1"),
            ("emitter-b", Role.emitter, "t1"),
            ("operator", Role.operator, "t1"),
            ("admin", Role.admin, None),
            ("emitter-t2", Role.emitter, "t2"),
            ("operator-t2", Role.operator, "t2"),
        ):
            made[name] = create_key(session, name=f"{name}-{world.RUN}", role=role, tenant=tenant)[
                1
            ]
    return made


@pytest.fixture
def policy_file(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """LEASEHOLD_POLICY_FILE pointed at a temp file for one test; the session's
    default (no policy file) is back afterwards."""
    from app.authority import policy
    from app.core.settings import get_settings

    path = tmp_path / "policies.cedar"
    os.environ["LEASEHOLD_POLICY_FILE"] = str(path)
    get_settings.cache_clear()

    def write(text: str) -> Path:
        path.write_text(text)
        policy.engine().refresh_now()
        return path

    yield write
    del os.environ["LEASEHOLD_POLICY_FILE"]
    get_settings.cache_clear()
