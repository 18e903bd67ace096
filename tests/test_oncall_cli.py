"""The on-call commands against a running `leasehold api`, as a person and a script
would use them (PRODUCT.md, "Command line")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.support.api import auth, event, started, states, unique
from tests.support.procs import free_port, wait_until
from tests.support.world import ROOT
from tests.test_cli import api_url, run_cli  # noqa: F401  (the API fixture)

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


def env(url: str, key: str | None) -> dict[str, str]:
    out = {**os.environ, "LEASEHOLD_URL": url, "COLUMNS": "200"}
    out.pop("LEASEHOLD_KEY", None)
    if key is not None:
        out["LEASEHOLD_KEY"] = key
    return out


def as_json(*args: str, url: str, key: str) -> Any:
    done = run_cli(*args, "--json", env=env(url, key))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_oncall_commands_over_the_api(
    api_url: str,  # noqa: F811
    app_client: Any,
    keys: dict[str, str],
) -> None:
    name = unique("oncall") + "\x1b[31m"  # what an emitter wrote reaches no terminal raw
    answer = app_client.post(
        "/v1/events", json=started(name, {"kv": "kv-reader"}), headers=auth(keys["emitter"])
    )
    assert answer.status_code == 202, answer.text
    wait_until(lambda: states("t1", name) == {"kv": "active"})
    op = keys["operator"]

    creds = as_json("credentials", "list", "--task", name, url=api_url, key=op)
    assert [(c["task"], c["grant"], c["state"]) for c in creds] == [(name, "kv", "active")]
    cred_id = creds[0]["id"]

    shown = as_json("tasks", "show", name, url=api_url, key=op)
    assert shown["id"] == name and shown["state"] == "running"
    assert [c["id"] for c in shown["credentials"]] == [cred_id]

    listed = as_json("tasks", "list", "--state", "running", "--limit", "500", url=api_url, key=op)
    assert name in {t["id"] for t in listed}

    people = run_cli("tasks", "show", name, env=env(api_url, op))
    assert people.returncode == 0, people.stderr
    assert "\x1b" not in people.stdout and "\\x1b[31m" in people.stdout
    assert cred_id in people.stdout and "active" in people.stdout
    table = run_cli("credentials", "list", "--state", "active", env=env(api_url, op))
    assert table.stdout.startswith("ID ") and cred_id in table.stdout
    assert "\x1b" not in table.stdout

    revoked = as_json("credentials", "revoke", cred_id, url=api_url, key=op)
    assert revoked["state"] in ("revoking", "revoked")
    wait_until(lambda: states("t1", name) == {"kv": "revoked"})

    tail = run_cli("tail", "--for", "0.5", "--json", "--task", name, env=env(api_url, op))
    assert tail.returncode == 0, tail.stderr
    entries = [json.loads(line) for line in tail.stdout.splitlines()]
    actions = [e["action"] for e in entries]
    assert {"task_started", "minted", "revoke_requested", "revoked"} <= set(actions)
    assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)  # oldest first

    sweeps = as_json("sweeps", url=api_url, key=keys["admin"])
    assert isinstance(sweeps, list)
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_tail_follows_new_entries(api_url: str, app_client: Any, keys: dict[str, str]) -> None:  # noqa: F811
    name = unique("tailed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "tail", "--for", "8", "--interval", "0.3", "--json"],
        cwd=ROOT,
        env=env(api_url, keys["operator"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # the CLI has started and read the last entries
        app_client.post(
            "/v1/events", json=started(name, {"kv": "kv-reader"}), headers=auth(keys["emitter"])
        )
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    entries = [json.loads(line) for line in out.splitlines()]
    ids = [e["id"] for e in entries]
    assert len(ids) == len(set(ids)), "an entry printed twice"
    assert any(e["task"] == name and e["action"] == "task_started" for e in entries)
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_clear_errors(api_url: str, keys: dict[str, str]) -> None:  # noqa: F811
    bad = run_cli("credentials", "list", env=env(api_url, "lhk_not-a-key"))
    assert bad.returncode == 1 and "401" in bad.stderr and "LEASEHOLD_KEY" in bad.stderr
    emitter = run_cli("credentials", "list", env=env(api_url, keys["emitter"]))
    assert emitter.returncode == 1 and "403" in emitter.stderr
    none = run_cli("tasks", "list", env=env(api_url, None))
    assert none.returncode == 1 and "LEASEHOLD_KEY" in none.stderr
    down = run_cli("tasks", "list", env=env(f"http://127.0.0.1:{free_port()}", keys["operator"]))
    assert down.returncode == 1 and "cannot connect" in down.stderr
    for result in (bad, emitter, none, down):
        assert "Traceback" not in result.stderr


def test_version_help_and_completion() -> None:
    from app import __version__

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"leasehold {__version__}"
    helped = run_cli("--help", env={**os.environ, "COLUMNS": "200"})
    for name in ("LEASEHOLD_URL", "LEASEHOLD_KEY", "--install-completion", "credentials", "tail"):
        assert name in helped.stdout, name
    completion = run_cli("--show-completion", "bash", env={**os.environ, "SHELL": "/bin/bash"})
    assert completion.returncode == 0 and "complete" in completion.stdout


def test_status_before_db_upgrade_says_what_to_do(tmp_path: Any) -> None:
    fresh = {**os.environ, "LEASEHOLD_HOME": str(tmp_path)}
    fresh.pop("LEASEHOLD_DATABASE_URL")
    result = run_cli("status", env=fresh)
    assert result.returncode == 1
    assert "run `leasehold db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr
