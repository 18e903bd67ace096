"""deploy/: the alert rules pass promtool, name only metrics the app exports, and so
does the Grafana dashboard; the metrics they rely on move as they should."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import timedelta
from typing import Any

import pytest
import yaml
from sqlmodel import select

from app.core.db import session_scope
from app.core.models import Credential, Task, utcnow
from tests.support.api import auth, event, started, states, unique
from tests.support.procs import wait_until
from tests.support.world import ROOT
from tests.test_metrics import scrape, value

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "leasehold-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "leasehold-rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "leasehold-dashboard.json"
METRIC = re.compile(r"\bleasehold_[a-z_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: .ci/run installs Debian's prometheus package"
    return subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=60, check=False, cwd=RULES.parent
    )


def test_promtool_checks_and_tests_the_rules() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_rules_cover_what_issue_12_asks() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    exprs = " ".join(r["expr"] for r in rules)
    for name in (
        "leasehold_failing_revocations",
        "leasehold_last_sweep_timestamp_seconds",
        "leasehold_revoke_duration_seconds_bucket",
        "leasehold_second_claims_total",
    ):
        assert name in exprs, name


def _named() -> set[str]:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    names = {m for r in rules for m in METRIC.findall(r["expr"])}
    panels = json.loads(DASHBOARD.read_text())["panels"]
    names |= {m for p in panels for t in p["targets"] for m in METRIC.findall(t["expr"])}
    return names


def test_every_metric_named_is_exported(app_client: Any) -> None:
    families = scrape(app_client)
    # Every declared family counts, also one without samples yet (no revocation so far).
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {f.name + x for f in families.values() for x in suffixes.get(f.type, ("",))}
    named = _named()
    assert len(named) >= 10
    assert named <= exported, sorted(named - exported)


def test_events_counted_by_type_and_outcome(app_client: Any, keys: dict[str, str]) -> None:
    def count(type_: str, outcome: str) -> float:
        return value(scrape(app_client), "leasehold_events_total", type=type_, outcome=outcome)

    cases = [
        ("task.started", "accepted"),
        ("task.started", "duplicate"),
        ("unknown", "invalid"),
        ("unknown", "unauthenticated"),
        ("task.started", "unprocessable"),
    ]
    before = {c: count(*c) for c in cases}
    name = unique("counted")
    body = started(name, {"kv": "kv-reader"})
    emitter = auth(keys["emitter"])
    assert app_client.post("/v1/events", json=body, headers=emitter).status_code == 202
    assert app_client.post("/v1/events", json=body, headers=emitter).status_code == 200
    bad_json = {**emitter, "Content-Type": "application/json"}
    assert app_client.post("/v1/events", content=b"{", headers=bad_json).status_code == 400
    assert app_client.post("/v1/events", json=body, headers=auth("lhk_nope")).status_code == 401
    unknown = started(unique("counted"), {"kv": "no-such-profile"})
    assert app_client.post("/v1/events", json=unknown, headers=emitter).status_code == 422
    after = {c: count(*c) for c in cases}
    assert {c: after[c] - before[c] for c in cases} == dict.fromkeys(cases, 1.0)
    wait_until(lambda: states("t1", name) == {"kv": "active"})
    app_client.post("/v1/events", json=event("succeeded", name), headers=emitter)


def test_oldest_active_credential_age(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("oldest")
    emitter = auth(keys["emitter"])
    app_client.post("/v1/events", json=started(name, {"kv": "kv-reader"}), headers=emitter)
    wait_until(lambda: states("t1", name) == {"kv": "active"})
    age = value(scrape(app_client), "leasehold_oldest_active_credential_age_seconds")
    assert 0 < age < 3000
    with session_scope() as s:  # as if minted 3 hours ago
        cred = s.exec(select(Credential).join(Task).where(Task.name == name)).one()
        cred.minted_at = utcnow() - timedelta(hours=3)
    age = value(scrape(app_client), "leasehold_oldest_active_credential_age_seconds")
    assert 3 * 3600 <= age < 3 * 3600 + 600
    app_client.post("/v1/events", json=event("succeeded", name), headers=emitter)
    wait_until(lambda: states("t1", name) == {"kv": "revoked"})
    age = value(scrape(app_client), "leasehold_oldest_active_credential_age_seconds")
    assert age < 3 * 3600
