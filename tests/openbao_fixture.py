"""A real OpenBao dev server for the test session, on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.local.openbao_dev import DevServer, start_dev_server


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    log_path = tmp_path_factory.mktemp("openbao") / "bao.log"
    with start_dev_server(log_path=log_path) as server:
        yield server
